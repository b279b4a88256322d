package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"math"
	"net"
	"os"
	"strconv"
	"strings"
	"time"
)

// config is the contract's options (docs/protocol.md 3), as servers/config.py
// declares them. Options Python leaves at None ("off", "Go's choice") are
// told apart from an explicit value by parseFlags, because Python refuses
// `--burst 0` or `--gomaxprocs 0` while it accepts leaving them out.
type config struct {
	host, protocol, rateMode, fault, dispatch                  string
	rateStore, rateScope, rateOnError                          string        // memory or redis://...; connection or client; allow or deny
	redis                                                      *redisAddress // the parsed redis:// store; nil: memory
	port, maxConns, maxFrame, metricsPort, gomaxprocs, workers int           // metricsPort -1: off; gomaxprocs 0: Go's choice
	idle, frame, drain, rate, burst                            float64       // seconds; requests/s (0: off); tokens
	maxBuffered                                                int64         // the buffer budget, bytes
}

// maxTimeout bounds every timeout option (servers/config.py MAX_TIMEOUT_S):
// ~11.6 days, which every backend's timer API holds. Without a bound,
// `--idle-timeout 1e10` overflows time.Duration (int64 nanoseconds, at most
// ~292 years) into a deadline in the past, and every connection ends at once.
const maxTimeout = 1_000_000

// parseFlags reads the contract's options (Go's flag package takes --name value)
// and refuses what servers/config.py refuses, with the same message.
func parseFlags(args []string) (*config, error) {
	c := &config{}
	fs := flag.NewFlagSet("conclab-go", flag.ContinueOnError)
	fs.SetOutput(io.Discard) // main reports errors in one line
	fs.StringVar(&c.host, "host", "127.0.0.1", "bind address")
	fs.IntVar(&c.port, "port", 0, "TCP port (0: any free one)")
	fs.StringVar(&c.protocol, "protocol", "framed", "framed or raw (RFC 862 echo)")
	fs.IntVar(&c.maxConns, "max-conns", 10000, `connection cap; over it ERROR "server busy"`)
	fs.Float64Var(&c.idle, "idle-timeout", 60, "seconds without a complete frame (raw: a byte)")
	fs.Float64Var(&c.frame, "frame-timeout", 10, "seconds a started frame has to complete")
	fs.IntVar(&c.maxFrame, "max-frame", 1048576, "largest frame length (op + payload)")
	fs.Int64Var(&c.maxBuffered, "max-buffered", 256<<20, `budget of request bytes held, not yet answered; past it ERROR "server busy"`)
	fs.Float64Var(&c.drain, "drain-timeout", 5, "graceful shutdown deadline, seconds")
	fs.IntVar(&c.metricsPort, "metrics-port", -1, "serve Prometheus /metrics on this port (default: off)")
	fs.Float64Var(&c.rate, "rate-limit", 0, "requests/s per connection, token bucket (default: off)")
	fs.Float64Var(&c.burst, "burst", 0, "token bucket size (default: the rate, at least 1)")
	fs.StringVar(&c.rateMode, "rate-limit-mode", "delay", "delay or reject")
	fs.StringVar(&c.rateStore, "rate-limit-store", "memory", "where the token bucket lives: memory or redis://HOST:PORT[/DB]")
	fs.StringVar(&c.rateScope, "rate-limit-scope", "connection", "what one bucket belongs to: connection, or client (the peer's IP)")
	fs.StringVar(&c.rateOnError, "rate-limit-on-error", "allow", "a redis store unreachable or slow: allow (admit) or deny (ERROR \"rate limited\")")
	fs.StringVar(&c.fault, "fault", "none", "none, leak, no-deadline, unbounded or hard-kill")
	fs.IntVar(&c.gomaxprocs, "gomaxprocs", 0, "GOMAXPROCS (default: Go's choice)")
	fs.IntVar(&c.workers, "workers", 0, "threadpool only: checked, then ignored")
	fs.StringVar(&c.dispatch, "dispatch", "connection", "threadpool only: checked, then ignored")
	if err := fs.Parse(args); errors.Is(err, flag.ErrHelp) {
		fs.SetOutput(os.Stdout)
		fs.PrintDefaults()
		os.Exit(0)
	} else if err != nil {
		return nil, err
	}
	given := map[string]bool{} // the options on the command line: Python's "not None"
	fs.Visit(func(f *flag.Flag) { given[f.Name] = true })
	if err := c.validate(fs.Args(), given); err != nil {
		return nil, err
	}
	if !given["rate-limit"] {
		c.rate = 0 // off
	}
	if !given["burst"] {
		c.burst = math.Max(c.rate, 1) // the rate, but whole tokens: a bucket under 1 would never fill
	}
	if !given["metrics-port"] {
		c.metricsPort = -1
	}
	if !given["gomaxprocs"] {
		c.gomaxprocs = 0
	}
	return c, nil
}

// validate is servers/config.py's ServerConfig.validate, check for check and
// in the same order, so both sides name the same first problem. The
// comparisons are written as Python's are: NaN fails every one of them.
func (c *config) validate(rest []string, given map[string]bool) error {
	first := ""
	if len(rest) > 0 {
		first = rest[0]
	}
	finite := func(name string, seconds float64) check {
		return check{!math.IsNaN(seconds) && !math.IsInf(seconds, 0) && seconds <= maxTimeout,
			fmt.Sprintf("--%s must be a finite number of seconds, at most %d", name, maxTimeout)}
	}
	checks := []check{
		// what argparse refuses before validate() runs
		{len(rest) == 0, "unexpected argument " + first},
		{c.protocol == "framed" || c.protocol == "raw", "--protocol must be framed or raw"},
		{c.rateMode == "delay" || c.rateMode == "reject", "--rate-limit-mode must be delay or reject"},
		{strings.Contains(" none leak no-deadline unbounded hard-kill ", " "+c.fault+" "),
			"--fault must be none, leak, no-deadline, unbounded or hard-kill"},
		{c.dispatch == "connection" || c.dispatch == "request", "--dispatch must be connection or request"},
		{c.rateStore == "memory" || strings.HasPrefix(c.rateStore, "redis://"), "--rate-limit-store must be memory or redis://HOST:PORT[/DB]"},
		{c.rateScope == "connection" || c.rateScope == "client", "--rate-limit-scope must be connection or client"},
		{c.rateOnError == "allow" || c.rateOnError == "deny", "--rate-limit-on-error must be allow or deny"},
		// validate()
		{0 <= c.port && c.port <= 65535, "--port must be in 0..65535"},
		{c.maxConns >= 1, "--max-conns must be at least 1"},
		{c.idle > 0, "--idle-timeout must be positive"},
		{c.frame > 0, "--frame-timeout must be positive"},
		finite("idle-timeout", c.idle),
		finite("frame-timeout", c.frame),
		finite("drain-timeout", c.drain),
		{1 <= c.maxFrame && c.maxFrame <= 0xFFFFFFFF, "--max-frame must be in 1..4294967295"},
		{c.maxBuffered >= int64(c.maxFrame), "--max-buffered must be at least --max-frame (one maximal frame must fit)"},
		{c.drain >= 0, "--drain-timeout must not be negative"},
		{!given["metrics-port"] || 0 <= c.metricsPort && c.metricsPort <= 65535, "--metrics-port must be in 0..65535"},
		{!given["rate-limit"] || c.rate > 0, "--rate-limit must be positive"},
		{!given["burst"] || c.burst >= 1, "--burst must be at least 1"},
		{!given["workers"] || c.workers >= 1, "--workers must be at least 1"},
		{!given["gomaxprocs"] || c.gomaxprocs >= 1, "--gomaxprocs must be at least 1"},
		// the shared rate limit (docs/ratelimit.md): each control changes what --rate-limit does, so
		// without it one is a mistake to report, not a setting to ignore
		{c.rateStore == "memory" || given["rate-limit"], "--rate-limit-store needs --rate-limit"},
		{c.rateScope == "connection" || given["rate-limit"], "--rate-limit-scope needs --rate-limit"},
		{c.rateOnError == "allow" || c.rateStore != "memory", "--rate-limit-on-error needs --rate-limit-store redis://HOST:PORT (memory never fails)"},
	}
	for _, rule := range checks {
		if !rule.ok {
			return errors.New(rule.msg)
		}
	}
	if c.rateStore != "memory" {
		addr, err := parseRedisURL(c.rateStore)
		if err != nil {
			return err
		}
		c.redis = &addr
	}
	return nil
}

// storeLabel is the store as STATS and the final line show it: memory, or
// redis://HOST:PORT (no database: where it is, not how it is used).
func (c *config) storeLabel() string {
	if c.redis == nil {
		return "memory"
	}
	return "redis://" + net.JoinHostPort(c.redis.host, strconv.Itoa(c.redis.port))
}

type check struct {
	ok  bool
	msg string
}

// seconds converts seconds to a time.Duration, saturating at the largest one:
// Go leaves the conversion of an out-of-range float undefined (on amd64 it
// gives the most negative Duration, a deadline in the past). Validated
// timeouts never get near it; a token-bucket wait at a tiny --rate-limit can.
func seconds(s float64) time.Duration {
	if ns := s * float64(time.Second); ns < math.MaxInt64 {
		return time.Duration(ns)
	}
	return math.MaxInt64 // also NaN: "never"
}
