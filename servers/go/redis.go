// The shared token bucket in Redis, the Go side of servers/redis_bucket.py
// (docs/ratelimit.md): the same Lua script, text for text, run with EVALSHA
// and loaded again on NOSCRIPT; the same keys, verdicts, on-error rule, 50 ms
// deadline per call and one reconnect attempt per 100 ms after a failure.
//
// A goroutine per connection waits for Redis by blocking, so the client is a
// blocking one: a bounded pool of connections (a goroutine takes an idle one,
// or dials, or parks until one is free, and gives it back after its call),
// each call under one deadline. RESP2 is our own, in a few dozen lines of the
// standard library, like the Python side: the server stays dependency-free.
package main

import (
	"bufio"
	"crypto/sha1"
	_ "embed"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net"
	"net/url"
	"os"
	"strconv"
	"strings"
	"sync/atomic"
	"time"
)

const (
	redisCallTimeout       = 50 * time.Millisecond  // one request's whole dealing with Redis
	redisReconnectInterval = 100 * time.Millisecond // at most one connect per interval after a failure
	redisKeyPrefix         = "conclab:bucket:"
	redisMaxConns          = 64 // connections to Redis per server process (the pool's bound)
)

// bucketScript is the token bucket's Lua script, bucket.lua: servers/redis_bucket.py reads the same file.
//
//go:embed bucket.lua
var bucketScript string

var bucketSHA = func() string { sum := sha1.Sum([]byte(bucketScript)); return hex.EncodeToString(sum[:]) }()

// ---------------------------------------------------------------- RESP2

// respError is an error reply (-ERR ...): a value read from the stream, not a broken stream.
type respError string

func (e respError) Error() string { return string(e) }

// kind is the error's first word (NOSCRIPT, WRONGTYPE, ERR).
func (e respError) kind() string { return strings.SplitN(string(e), " ", 2)[0] }

var errRESP = errors.New("redis: not a RESP2 reply")

// respCommand encodes a command as Redis reads it: an array of bulk strings.
func respCommand(args ...string) []byte {
	b := make([]byte, 0, 64)
	b = append(b, '*')
	b = strconv.AppendInt(b, int64(len(args)), 10)
	b = append(b, '\r', '\n')
	for _, a := range args {
		b = append(b, '$')
		b = strconv.AppendInt(b, int64(len(a)), 10)
		b = append(b, '\r', '\n')
		b = append(b, a...)
		b = append(b, '\r', '\n')
	}
	return b
}

// readRESP reads one reply: string (simple string), respError, int64, []byte (bulk),
// nil (nil bulk or array), []interface{} (array). A stream that is not RESP2 is an error.
func readRESP(r *bufio.Reader) (interface{}, error) {
	line, err := r.ReadString('\n')
	if err != nil {
		return nil, err
	}
	if len(line) < 3 || line[len(line)-2] != '\r' {
		return nil, errRESP
	}
	kind, text := line[0], line[1:len(line)-2]
	switch kind {
	case '+':
		return text, nil
	case '-':
		return respError(text), nil
	case ':':
		n, err := strconv.ParseInt(text, 10, 64)
		if err != nil {
			return nil, errRESP
		}
		return n, nil
	case '$':
		n, err := strconv.Atoi(text)
		if err != nil {
			return nil, errRESP
		}
		if n < 0 {
			return nil, nil
		}
		data := make([]byte, n+2)
		if _, err := io.ReadFull(r, data); err != nil {
			return nil, err
		}
		if data[n] != '\r' || data[n+1] != '\n' {
			return nil, errRESP
		}
		return data[:n], nil
	case '*':
		n, err := strconv.Atoi(text)
		if err != nil {
			return nil, errRESP
		}
		if n < 0 {
			return nil, nil
		}
		items := make([]interface{}, n)
		for i := range items {
			if items[i], err = readRESP(r); err != nil {
				return nil, err
			}
		}
		return items, nil
	}
	return nil, errRESP
}

// ---------------------------------------------------------------- settings, keys, verdicts

type redisAddress struct {
	host string
	port int
	db   int
}

// parseRedisURL reads redis://HOST:PORT[/DB]; a one-line error otherwise.
func parseRedisURL(raw string) (redisAddress, error) {
	usage := "expected redis://HOST:PORT[/DB]"
	fail := func(why string) (redisAddress, error) {
		return redisAddress{}, fmt.Errorf("--rate-limit-store %q: %s", raw, why)
	}
	u, err := url.Parse(raw)
	if err != nil || u.Scheme != "redis" || u.Opaque != "" {
		return fail(usage)
	}
	if u.User != nil || u.RawQuery != "" || u.Fragment != "" {
		return fail("no user, password, query or fragment: " + usage)
	}
	if u.Hostname() == "" || u.Port() == "" {
		return fail("a host and a port are needed: " + usage)
	}
	port, err := strconv.Atoi(u.Port())
	if err != nil || port < 0 || port > 65535 {
		return fail("the port is not a number from 0 to 65535")
	}
	if port == 0 {
		return fail("port 0 is not a Redis port")
	}
	db := 0
	if path := strings.Trim(u.Path, "/"); path != "" {
		if db, err = strconv.Atoi(path); err != nil || db < 0 {
			return fail("the database is a number (redis://HOST:PORT/0)")
		}
	}
	return redisAddress{u.Hostname(), port, db}, nil
}

var (
	connectionIDs atomic.Int64
	hostName, _   = os.Hostname() // read once: a Go process does not fork
)

// newConnectionID is an id no other connection of any process or host has: host name, pid, a counter.
func newConnectionID() string {
	return fmt.Sprintf("%s:%d:%d", hostName, os.Getpid(), connectionIDs.Add(1))
}

// bucketKey is the bucket a request takes from: per connection, or per client (the peer's IP).
func bucketKey(scope, peerIP, connectionID string) string {
	if scope == "client" {
		return redisKeyPrefix + peerIP
	}
	return redisKeyPrefix + connectionID
}

// verdict is what a request gets: admitted (after wait) or not; storeFailed: the on-error rule gave it.
type verdict struct {
	admitted    bool
	wait        time.Duration
	storeFailed bool
}

// verdictOf reads the script's reply: reject mode 1/0, delay mode the wait in microseconds.
func verdictOf(reply int64, mode string) verdict {
	if mode == "reject" {
		return verdict{admitted: reply == 1}
	}
	if reply <= 0 {
		return verdict{admitted: true}
	}
	return verdict{admitted: true, wait: time.Duration(reply) * time.Microsecond}
}

// onErrorVerdict: allow admits at once (fail open, the default), deny rejects.
func onErrorVerdict(policy string) verdict {
	return verdict{admitted: policy != "deny", storeFailed: true}
}

// ---------------------------------------------------------------- the client

type redisConn struct {
	conn net.Conn
	r    *bufio.Reader
}

// storeCounters are the store's counters, shown in STATS, the final line and /metrics.
type storeCounters struct {
	calls  atomic.Int64 // rate_store_calls: EVALSHA round trips made (sent on a connection)
	errors atomic.Int64 // rate_store_errors: calls given the on-error verdict (timeout, refused, broken, skipped)
}

// redisBucket takes tokens from buckets in one Redis; safe for any number of goroutines.
//
// Its connections are a bounded pool: slots holds one token per connection
// open or being dialled (at most redisMaxConns), idle the open ones free for
// a call. A goroutine takes an idle connection, or a slot and dials, or parks
// until one of them is free: waiting counts in the call's deadline, as a
// thread waiting for the Python client's lock does. Bounded, because a
// connection opened and closed per call would leave a TIME_WAIT socket per
// request behind, and a busy server would run out of ephemeral ports.
type redisBucket struct {
	addr      redisAddress
	rate      string // as the script reads them: the shortest text of the float
	burst     string
	mode      string
	onError   verdict
	timeout   time.Duration
	idle      chan *redisConn
	slots     chan struct{}
	notBefore atomic.Int64 // unix nanoseconds: after a failure, no connect before; 0: healthy
	counts    *storeCounters
	Loads     atomic.Int64 // NOSCRIPT fallbacks
}

// newRedisBucket is a client of the Redis at rawURL; counts may be nil (it then keeps its own).
func newRedisBucket(rawURL string, rate, burst float64, mode, onError string, counts *storeCounters) (*redisBucket, error) {
	addr, err := parseRedisURL(rawURL)
	if err != nil {
		return nil, err
	}
	return newRedisBucketAt(addr, rate, burst, mode, onError, counts), nil
}

// newRedisBucketAt is newRedisBucket for an address already parsed.
func newRedisBucketAt(addr redisAddress, rate, burst float64, mode, onError string, counts *storeCounters) *redisBucket {
	if counts == nil {
		counts = &storeCounters{}
	}
	return &redisBucket{
		addr: addr, mode: mode, onError: onErrorVerdict(onError), timeout: redisCallTimeout, counts: counts,
		rate:  strconv.FormatFloat(rate, 'g', -1, 64),
		burst: strconv.FormatFloat(burst, 'g', -1, 64),
		idle:  make(chan *redisConn, redisMaxConns),
		slots: make(chan struct{}, redisMaxConns),
	}
}

// take is one token from bucket key: the verdict, within the timeout. The
// goroutine blocks on the round trip; Go's runtime parks it on the netpoller
// and runs the others meanwhile.
func (b *redisBucket) take(key string) verdict {
	deadline := time.Now().Add(b.timeout)
	c := b.acquire(deadline)
	if c == nil {
		return b.failed()
	}
	b.counts.calls.Add(1)
	v, err := b.call(c, key, deadline)
	if err != nil {
		b.discard(c)
		b.broke()
		return b.failed()
	}
	if b.notBefore.Load() != 0 { // (a load, not a store, per call: no write to a shared line while healthy)
		b.notBefore.Store(0)
	}
	b.idle <- c // never blocks: idle has room for every slot
	return v
}

func (b *redisBucket) failed() verdict {
	b.counts.errors.Add(1)
	return b.onError
}

// acquire is a connection for one call: an idle one, a new one, or one that
// comes free before the deadline; nil if none (the on-error verdict).
func (b *redisBucket) acquire(deadline time.Time) *redisConn {
	select {
	case c := <-b.idle:
		return c
	default:
	}
	timer := time.NewTimer(time.Until(deadline))
	defer timer.Stop()
	select {
	case c := <-b.idle:
		return c
	case b.slots <- struct{}{}:
		return b.dial(deadline)
	case <-timer.C:
		return nil
	}
}

// dial opens a connection in the slot just taken, if the reconnect interval
// allows; nil (the slot given back) if not, or if it fails.
func (b *redisBucket) dial(deadline time.Time) *redisConn {
	if !b.mayDial() {
		<-b.slots
		return nil
	}
	dialer := net.Dialer{Deadline: deadline}
	conn, err := dialer.Dial("tcp", net.JoinHostPort(b.addr.host, strconv.Itoa(b.addr.port)))
	if err != nil {
		<-b.slots
		b.broke()
		return nil
	}
	c := &redisConn{conn: conn, r: bufio.NewReader(conn)}
	if b.addr.db != 0 {
		conn.SetDeadline(deadline)
		if reply, err := c.roundtrip(respCommand("SELECT", strconv.Itoa(b.addr.db))); err != nil || reply != "OK" {
			b.discard(c)
			b.broke()
			return nil
		}
	}
	return c
}

// mayDial: while healthy any goroutine may connect; after a failure, one per
// reconnect interval (the one that moves the gate on), the others get the
// on-error verdict at once.
func (b *redisBucket) mayDial() bool {
	for {
		notBefore, now := b.notBefore.Load(), time.Now().UnixNano()
		if notBefore == 0 {
			return true
		}
		if now < notBefore {
			return false
		}
		if b.notBefore.CompareAndSwap(notBefore, now+int64(redisReconnectInterval)) {
			return true
		}
	}
}

// broke closes the gate for one reconnect interval and drops the idle
// connections: a Redis that failed one call (restarted, stalled) has most
// likely failed the connections that wait for the next ones too.
func (b *redisBucket) broke() {
	b.notBefore.Store(time.Now().Add(redisReconnectInterval).UnixNano())
	b.close()
}

// discard closes a connection and gives its slot back: a late reply must never be read as the next call's.
func (b *redisBucket) discard(c *redisConn) {
	c.conn.Close()
	<-b.slots
}

func (c *redisConn) roundtrip(cmd []byte) (interface{}, error) {
	if _, err := c.conn.Write(cmd); err != nil {
		return nil, err
	}
	return readRESP(c.r)
}

// call runs the script on c: EVALSHA, and on NOSCRIPT, SCRIPT LOAD then EVALSHA once more.
func (b *redisBucket) call(c *redisConn, key string, deadline time.Time) (verdict, error) {
	c.conn.SetDeadline(deadline)
	evalsha := respCommand("EVALSHA", bucketSHA, "1", key, b.rate, b.burst, b.mode)
	reply, err := c.roundtrip(evalsha)
	if e, ok := reply.(respError); err == nil && ok && e.kind() == "NOSCRIPT" {
		b.Loads.Add(1)
		if reply, err = c.roundtrip(respCommand("SCRIPT", "LOAD", bucketScript)); err != nil {
			return verdict{}, err
		}
		if sha, ok := reply.([]byte); !ok || string(sha) != bucketSHA {
			return verdict{}, fmt.Errorf("redis: SCRIPT LOAD answered %v", reply)
		}
		reply, err = c.roundtrip(evalsha)
	}
	if err != nil {
		return verdict{}, err
	}
	n, ok := reply.(int64)
	if !ok {
		return verdict{}, fmt.Errorf("redis: the bucket script answered %v", reply)
	}
	return verdictOf(n, b.mode), nil
}

// close closes the idle connections; calls in flight close theirs when they end.
func (b *redisBucket) close() {
	for {
		select {
		case c := <-b.idle:
			b.discard(c)
		default:
			return
		}
	}
}
