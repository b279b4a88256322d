// Command conclab-go is the reference backend of conclab: the lab's echo server
// written the way a Go interviewer expects a TCP server to be written.
//
//   - one goroutine per connection, released by `defer` on every path;
//   - SetReadDeadline for the idle and frame timeouts (no slowloris);
//   - a buffered channel as the connection semaphore (--max-conns);
//   - signal.Notify + sync.WaitGroup for the graceful drain;
//   - sync.Pool for payload buffers, sync/atomic for the counters;
//   - a per-connection token bucket (--rate-limit), touched only by its
//     connection's goroutine, so it needs no lock;
//   - a write deadline on every write (--idle-timeout): a client that stops
//     reading is dropped, and its goroutine with it;
//   - CLOSE_WAIT monitoring in the Prometheus metrics (--metrics-port).
//
// The wire protocol, controls and shutdown are the lab's contract
// (docs/protocol.md); servers/session.py is the Python twin of serveFramed.
// Standard library only.
package main

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"errors"
	"flag"
	"fmt"
	"io"
	"math"
	"net"
	"net/http"
	"os"
	"os/signal"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

// Every frame is: u32 big-endian length (= 1 + len(payload)), u8 op, payload.
const (
	opEcho, opPing, opPong, opWork, opStats, opError = 0x01, 0x02, 0x03, 0x04, 0x05, 0xFF
	maxPing                                          = 64 // bytes of PING id
)

// busyFrame is ERROR "server busy", for connections over the cap.
var busyFrame = append([]byte{0, 0, 0, 12, opError}, "server busy"...)

// stats is shared by every goroutine: lock-free atomic counters.
type stats struct {
	active, total, rejected, requests, bytesIn, bytesOut     atomic.Int64
	idleTimeouts, frameTimeouts, protocolErrors, rateLimited atomic.Int64
}

// each visits the counters in the order STATS prints them, with their help text.
func (st *stats) each(f func(name, help string, v *atomic.Int64)) {
	f("connections_active", "Connections open now.", &st.active)
	f("connections_total", "Connections accepted under the cap.", &st.total)
	f("connections_rejected", "Connections refused over --max-conns.", &st.rejected)
	f("requests_total", "Requests answered.", &st.requests)
	f("bytes_in", "Bytes received.", &st.bytesIn)
	f("bytes_out", "Bytes sent.", &st.bytesOut)
	f("idle_timeouts", "Connections closed by the idle timeout.", &st.idleTimeouts)
	f("frame_timeouts", "Connections closed by the frame timeout.", &st.frameTimeouts)
	f("protocol_errors", "Connections closed for breaking the protocol.", &st.protocolErrors)
	f("rate_limited", "Requests refused by --rate-limit-mode reject.", &st.rateLimited)
}

// fields renders the counters as JSON members, spaced like Python's json.dumps.
func (st *stats) fields() string {
	b := fmt.Sprintf(`"backend": "go", "pid": %d`, os.Getpid())
	st.each(func(name, _ string, v *atomic.Int64) { b += fmt.Sprintf(`, "%s": %d`, name, v.Load()) })
	return b
}

type config struct {
	host, protocol, rateMode, fault                   string
	port, maxConns, maxFrame, metricsPort, gomaxprocs int
	idle, frame, drain, rate, burst                   float64 // seconds; requests/s; tokens
}

// parseFlags reads the contract's options (Go's flag package takes --name value).
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
	fs.Float64Var(&c.drain, "drain-timeout", 5, "graceful shutdown deadline, seconds")
	fs.IntVar(&c.metricsPort, "metrics-port", -1, "serve Prometheus /metrics on this port (-1: off)")
	fs.Float64Var(&c.rate, "rate-limit", 0, "requests/s per connection, token bucket (0: off)")
	fs.Float64Var(&c.burst, "burst", 0, "token bucket size (0: the rate, at least 1)")
	fs.StringVar(&c.rateMode, "rate-limit-mode", "delay", "delay or reject")
	fs.StringVar(&c.fault, "fault", "none", "none, leak, no-deadline, unbounded or hard-kill")
	fs.IntVar(&c.gomaxprocs, "gomaxprocs", 0, "GOMAXPROCS (0: Go's choice)")
	fs.String("workers", "", "ignored (thread-pool option)")
	fs.String("dispatch", "", "ignored (thread-pool option)")
	if err := fs.Parse(args); errors.Is(err, flag.ErrHelp) {
		fs.SetOutput(os.Stdout)
		fs.PrintDefaults()
		os.Exit(0)
	} else if err != nil {
		return nil, err
	}
	if c.burst == 0 {
		c.burst = math.Max(c.rate, 1) // the rate, but whole tokens: a bucket under 1 would never fill
	}
	for _, check := range []struct {
		ok  bool
		msg string
	}{ // the rules of servers/config.py
		{fs.NArg() == 0, "unexpected argument " + fs.Arg(0)},
		{c.protocol == "framed" || c.protocol == "raw", "--protocol must be framed or raw"},
		{c.rateMode == "delay" || c.rateMode == "reject", "--rate-limit-mode must be delay or reject"},
		{strings.Contains(" none leak no-deadline unbounded hard-kill ", " "+c.fault+" "),
			"--fault must be none, leak, no-deadline, unbounded or hard-kill"},
		{0 <= c.port && c.port <= 65535, "--port must be in 0..65535"},
		{c.maxConns >= 1, "--max-conns must be at least 1"},
		{c.idle > 0 && c.frame > 0, "--idle-timeout and --frame-timeout must be positive"},
		{1 <= c.maxFrame && c.maxFrame <= 0xFFFFFFFF, "--max-frame must be in 1..4294967295"},
		{c.drain >= 0, "--drain-timeout must not be negative"},
		{-1 <= c.metricsPort && c.metricsPort <= 65535, "--metrics-port must be in 0..65535"},
		{c.rate >= 0 && (c.rate == 0 || c.burst >= 1), "--rate-limit must be positive, --burst at least 1"},
	} {
		if !check.ok {
			return nil, errors.New(check.msg)
		}
	}
	return c, nil
}

func seconds(s float64) time.Duration { return time.Duration(s * float64(time.Second)) }

type server struct {
	cfg   *config
	port  int // ours, to find our sockets in /proc/net/tcp
	stats stats
	sem   chan struct{}  // the connection semaphore: a slot per open connection (nil: unbounded)
	wg    sync.WaitGroup // a count per handler goroutine: the drain waits on it
	abort chan struct{}  // closed at the drain deadline: wakes handlers that sleep
	mu    sync.Mutex
	conns map[net.Conn]struct{} // open connections, for the drain (and the leak's reference)
}

// serve accepts until the signal handler closes the listener.
func (s *server) serve(ln net.Listener) {
	for {
		conn, err := ln.Accept()
		if errors.Is(err, net.ErrClosed) {
			return
		} else if err != nil { // EMFILE and friends: pause rather than spin
			fmt.Fprintln(os.Stderr, "conclab: accept:", err)
			time.Sleep(50 * time.Millisecond)
			continue
		}
		if !s.admit() {
			if s.cfg.protocol == "framed" {
				conn.SetWriteDeadline(time.Now().Add(time.Second))
				conn.Write(busyFrame)
			}
			conn.Close()
			continue
		}
		s.mu.Lock()
		s.conns[conn] = struct{}{}
		s.mu.Unlock()
		s.wg.Add(1) // before `go`, so the drain cannot miss it
		go s.handle(conn)
	}
}

// admit takes a semaphore slot without blocking: a full channel means over the cap.
func (s *server) admit() bool {
	if s.sem != nil { // nil with --fault unbounded: no cap at all
		select {
		case s.sem <- struct{}{}:
		default:
			s.stats.rejected.Add(1)
			return false
		}
	}
	s.stats.active.Add(1)
	s.stats.total.Add(1)
	return true
}

// Per-connection buffers: 1 KiB each instead of bufio's 4 KiB default saves
// 6 KiB per idle connection; small requests and pipelined replies still fit,
// and a larger payload bypasses the buffer (bufio reads/writes it directly).
const readBufSize, writeBufSize = 1024, 1024

// peer is a connection as its handler sees it. Just before each read from
// the socket it flushes the replies queued so far (and counts bytes in).
// bufio.Reader reads the socket only when its buffered input is used up, so
// replies to pipelined requests coalesce into one write, and no reply is
// left unsent while we wait for the client.
type peer struct {
	net.Conn
	st                    *stats
	r                     *bufio.Reader
	w                     *bufio.Writer
	idleStart, frameStart time.Time // frameStart is zero between frames
	head                  [5]byte   // reply header scratch, so replies allocate nothing
}

func (p *peer) Read(b []byte) (int, error) {
	if err := p.w.Flush(); err != nil {
		return 0, err
	}
	n, err := p.Conn.Read(b)
	p.st.bytesIn.Add(int64(n))
	return n, err
}

// deadlineWriter gives every write to the socket --idle-timeout to complete:
// a client that stops reading our replies is dropped, not waited for forever
// (what the socket timeout on sendall does in the Python thread backends).
type deadlineWriter struct {
	conn    net.Conn
	timeout time.Duration
}

func (w deadlineWriter) Write(b []byte) (int, error) {
	w.conn.SetWriteDeadline(time.Now().Add(w.timeout))
	return w.conn.Write(b)
}

// reply queues one frame (bufio errors are sticky: the next Flush reports them).
func (p *peer) reply(op byte, payload []byte) {
	p.st.bytesOut.Add(int64(len(payload) + 5))
	binary.BigEndian.PutUint32(p.head[:4], uint32(len(payload)+1))
	p.head[4] = op
	p.w.Write(p.head[:])
	p.w.Write(payload)
}

// handle owns one connection for its whole life: one goroutine per connection.
func (s *server) handle(conn net.Conn) {
	defer s.wg.Done()
	var err error
	defer func() { s.release(conn, err) }() // the article's `defer conn.Close()`: every path, even a panic
	p := &peer{Conn: conn, st: &s.stats, idleStart: time.Now()}
	var out io.Writer = deadlineWriter{conn, seconds(s.cfg.idle)}
	if s.cfg.fault == "no-deadline" {
		out = conn // FAULT no-deadline: a client that never reads holds its goroutine forever too
	}
	p.r, p.w = bufio.NewReaderSize(p, readBufSize), bufio.NewWriterSize(out, writeBufSize)
	if s.cfg.protocol == "raw" {
		err = s.serveRaw(p)
	} else {
		err = s.serveFramed(p)
	}
}

// release closes a finished connection and gives its slot back.
func (s *server) release(conn net.Conn, err error) {
	if s.cfg.fault == "leak" && errors.Is(err, io.EOF) {
		// FAULT leak: the peer closed and we return without Close(). The socket
		// sits in CLOSE_WAIT, its fd stays open (s.conns still refers to it, so
		// no finalizer closes it) and its slot is never given back: enough of
		// these and everyone gets "server busy".
		return
	}
	conn.Close()
	s.mu.Lock()
	delete(s.conns, conn)
	s.mu.Unlock()
	if s.sem != nil {
		<-s.sem // the slot first: whoever sees active drop can get in
	}
	s.stats.active.Add(-1)
}

// arm sets the read deadline: idle start + idle timeout or, while a frame is
// partly received, frame start + frame timeout if earlier. A read past it
// fails with os.ErrDeadlineExceeded: no goroutine waits forever on a client.
func (s *server) arm(p *peer) {
	if s.cfg.fault == "no-deadline" {
		return // FAULT no-deadline: a silent or dribbling client holds a goroutine and an fd forever
	}
	deadline := p.idleStart.Add(seconds(s.cfg.idle))
	if end := p.frameStart.Add(seconds(s.cfg.frame)); !p.frameStart.IsZero() && end.Before(deadline) {
		deadline = end
	}
	p.SetReadDeadline(deadline)
}

// A protocolError is a broken rule; its text is the reason in the ERROR frame.
type protocolError string

func (e protocolError) Error() string { return string(e) }

var errAborted = errors.New("aborted by the drain deadline")

// readFrame reads one whole frame into buf and returns its op. The length is
// checked as soon as its 4 bytes arrive, and buf grows only as payload bytes
// arrive: a hostile length allocates nothing it has not been sent.
func (s *server) readFrame(p *peer, buf *bytes.Buffer) (byte, error) {
	p.frameStart = time.Time{}
	s.arm(p)
	if _, err := p.r.Peek(1); err != nil { // between frames only the idle clock runs
		return 0, err
	}
	p.frameStart = time.Now() // a frame has started: its clock runs too
	s.arm(p)
	head, err := p.r.Peek(4)
	if err != nil {
		return 0, err
	}
	length := int64(binary.BigEndian.Uint32(head)) // copy it out: Peek's slice dies at the next read
	if length == 0 || length > int64(s.cfg.maxFrame) {
		return 0, protocolError(fmt.Sprintf("frame length %d outside 1..%d", length, s.cfg.maxFrame))
	}
	p.r.Discard(4)
	op, err := p.r.ReadByte()
	if err == nil {
		buf.Reset()
		_, err = io.CopyN(buf, p.r, length-1) // via bytes.Buffer.ReadFrom: grows as bytes come
	}
	return op, err
}

// bufPool recycles payload buffers: a connection borrows one for its life, so
// thousands of short connections do not each allocate one (less GC work).
var bufPool = sync.Pool{New: func() any { return new(bytes.Buffer) }}

// serveFramed answers frames in order until the client leaves or breaks a rule.
func (s *server) serveFramed(p *peer) error {
	buf := bufPool.Get().(*bytes.Buffer)
	defer func() {
		if buf.Cap() <= 64<<10 { // pooling a 1 MiB buffer would pin it: let the GC have it
			bufPool.Put(buf)
		}
	}()
	bucket := &tokenBucket{rate: s.cfg.rate, burst: s.cfg.burst, tokens: s.cfg.burst, last: time.Now()}
	for {
		op, err := s.readFrame(p, buf)
		if err != nil {
			return s.fail(p, err)
		}
		p.idleStart = time.Now() // a complete frame restarts the idle clock
		payload, reply := buf.Bytes(), op
		switch {
		case op == opPing && len(payload) > maxPing:
			err = protocolError(fmt.Sprintf("PING payload is %d bytes, at most %d allowed", len(payload), maxPing))
		case op == opPing:
			reply = opPong
		case op == opWork && len(payload) < 8:
			err = protocolError(fmt.Sprintf("WORK payload is %d bytes, needs at least 8 (io_us, cpu_us)", len(payload)))
		case op != opEcho && op != opWork && op != opStats:
			err = protocolError(fmt.Sprintf("unknown op 0x%02x", op))
		}
		if err != nil {
			return s.fail(p, err)
		}
		if s.cfg.rate > 0 && op != opStats { // STATS is exempt: the lab must always see its counters
			wait := bucket.take(time.Now(), s.cfg.rateMode == "delay")
			if wait > 0 && s.cfg.rateMode == "reject" {
				s.stats.rateLimited.Add(1)
				p.reply(opError, []byte("rate limited")) // and the connection stays open
				continue
			} else if wait > 0 && !s.pause(p, wait) {
				return errAborted
			}
		}
		s.stats.requests.Add(1)
		switch op {
		case opWork: // wait io_us the Go way (the goroutine parks, its thread runs others), then compute cpu_us
			if !s.pause(p, time.Duration(binary.BigEndian.Uint32(payload))*time.Microsecond) {
				return errAborted
			}
			burn(time.Duration(binary.BigEndian.Uint32(payload[4:])) * time.Microsecond)
		case opStats:
			payload = []byte("{" + s.stats.fields() + "}")
		}
		p.reply(reply, payload)  // sent when we next need input (see peer.Read)
		p.idleStart = time.Now() // a reply restarts the idle clock too
	}
}

// serveRaw is RFC 862 echo: whatever arrives goes back; no frames, no ERROR.
func (s *server) serveRaw(p *peer) error {
	for {
		p.idleStart = time.Now()
		s.arm(p)
		if _, err := p.r.Peek(1); err != nil {
			return s.fail(p, err)
		}
		data, _ := p.r.Peek(p.r.Buffered())
		s.stats.requests.Add(1)
		s.stats.bytesOut.Add(int64(len(data)))
		p.w.Write(data)
		p.r.Discard(len(data))
	}
}

// fail counts why a connection ends and, in framed mode, tells the client.
// Other errors (EOF, reset, the drain) end it silently.
func (s *server) fail(p *peer, err error) error {
	var reason protocolError
	if errors.As(err, &reason) {
		s.stats.protocolErrors.Add(1)
	} else if !errors.Is(err, os.ErrDeadlineExceeded) {
		return err
	} else if !p.frameStart.IsZero() && time.Since(p.frameStart) >= seconds(s.cfg.frame) {
		s.stats.frameTimeouts.Add(1)
		reason = "frame timeout"
	} else {
		s.stats.idleTimeouts.Add(1)
		reason = "idle timeout"
	}
	if s.cfg.protocol == "framed" {
		p.reply(opError, []byte(reason))
		p.w.Flush()
	}
	return err
}

// pause sends the replies already written, then sleeps d: false if the drain
// deadline cut the sleep short.
func (s *server) pause(p *peer, d time.Duration) bool {
	if p.w.Flush() != nil {
		return false
	}
	timer := time.NewTimer(d)
	defer timer.Stop()
	select {
	case <-timer.C:
		return true
	case <-s.abort:
		return false
	}
}

// burn computes for d: a busy loop. Go preempts it, so it delays no other connection.
func burn(d time.Duration) {
	for end := time.Now().Add(d); time.Now().Before(end); {
	}
}

// tokenBucket allows `rate` requests/s on average, `burst` at once. It is per
// connection, so only its own goroutine touches it: no lock.
type tokenBucket struct {
	rate, burst, tokens float64
	last                time.Time
}

// take spends a token and returns how long until it was there (0: at once).
// With borrow (delay mode) an absent token is taken on credit and the caller
// waits; without (reject mode) nothing is spent when the bucket is empty.
func (b *tokenBucket) take(now time.Time, borrow bool) time.Duration {
	b.tokens = math.Min(b.burst, b.tokens+now.Sub(b.last).Seconds()*b.rate)
	b.last = now
	wait := seconds(math.Max(0, 1-b.tokens) / b.rate)
	if wait == 0 || borrow {
		b.tokens--
	}
	return wait
}

// drain is the graceful shutdown of docs/protocol.md 4, once the listener is
// closed. CloseRead (shutdown SHUT_RD) makes each handler's next read return
// EOF after the input already received: complete frames are answered, idle
// connections close at once, busy ones after their reply. At the deadline
// what is left is reset. Returns how many were aborted.
func (s *server) drain() (aborted int) {
	s.mu.Lock()
	for conn := range s.conns {
		conn.(*net.TCPConn).CloseRead()
	}
	s.mu.Unlock()
	done := make(chan struct{})
	go func() { s.wg.Wait(); close(done) }()
	select {
	case <-done:
		return 0
	case <-time.After(seconds(s.cfg.drain)):
	}
	close(s.abort)
	s.mu.Lock()
	for conn := range s.conns {
		conn.(*net.TCPConn).SetLinger(0) // RST, not FIN: this is an abort
		conn.Close()
		aborted++
	}
	s.mu.Unlock()
	select { // their reads and writes fail, sleepers wake: give them a moment to leave
	case <-done:
	case <-time.After(time.Second):
	}
	return aborted
}

// metrics is the Prometheus text exposition (format 0.0.4), written by hand.
func (s *server) metrics(w http.ResponseWriter, _ *http.Request) {
	w.Header().Set("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
	s.stats.each(func(name, help string, v *atomic.Int64) {
		if name == "connections_active" {
			metric(w, "conclab_"+name, "gauge", help, v.Load())
		} else {
			metric(w, "conclab_"+strings.TrimSuffix(name, "_total")+"_total", "counter", help, v.Load())
		}
	})
	fds, _ := os.ReadDir("/proc/self/fd")
	metric(w, "conclab_open_fds", "gauge", "File descriptors open in this process.", int64(len(fds)-1)) // -1: ReadDir's own
	metric(w, "conclab_close_wait_connections", "gauge",
		"Sockets on the server port in CLOSE_WAIT: the peer closed, we did not.", s.closeWait())
}

func metric(w io.Writer, name, kind, help string, value int64) {
	fmt.Fprintf(w, "# HELP %s %s\n# TYPE %s %s\n%s{backend=\"go\"} %d\n", name, help, name, kind, name, value)
}

// closeWait counts the lines of /proc/net/tcp{,6} in state 08 (CLOSE_WAIT)
// whose local port is ours. If it only grows, a conn.Close() is missing.
func (s *server) closeWait() (n int64) {
	port := fmt.Sprintf(":%04X", s.port)
	for _, file := range []string{"/proc/net/tcp", "/proc/net/tcp6"} {
		data, _ := os.ReadFile(file)
		for _, line := range strings.Split(string(data), "\n") {
			if f := strings.Fields(line); len(f) > 3 && f[3] == "08" && strings.HasSuffix(f[1], port) {
				n++
			}
		}
	}
	return n
}

// listen binds host:port (an IPv4 literal binds IPv4 only, as in Python),
// or says in one line why it cannot.
func listen(host string, port int) (net.Listener, error) {
	network := "tcp"
	if ip := net.ParseIP(host); ip != nil && ip.To4() != nil {
		network = "tcp4"
	} else if ip != nil {
		network = "tcp6"
	}
	ln, err := net.Listen(network, net.JoinHostPort(host, strconv.Itoa(port)))
	if sysErr := (*os.SyscallError)(nil); errors.As(err, &sysErr) {
		err = sysErr.Err // "address already in use", not "listen tcp4 ...: bind: address already in use"
	}
	if err != nil {
		return nil, fmt.Errorf("cannot listen on %s:%d: %v", host, port, err)
	}
	return ln, nil
}

func die(err error) {
	fmt.Fprintln(os.Stderr, "conclab: error:", err)
	os.Exit(2)
}

func main() {
	cfg, err := parseFlags(os.Args[1:])
	if err != nil {
		die(err)
	}
	if cfg.gomaxprocs > 0 { // the Python launcher sets the GOMAXPROCS variable instead: same knob
		runtime.GOMAXPROCS(cfg.gomaxprocs)
	}
	if os.Getenv("CONCLAB_WARNED") == "" { // set by the Python CLI, which has printed these
		if ip := net.ParseIP(cfg.host); cfg.host != "localhost" && (ip == nil || !ip.IsLoopback()) {
			fmt.Fprintf(os.Stderr, "conclab: warning: binding %s: this server is reachable from other machines\n", cfg.host)
		}
		if cfg.fault != "none" {
			fmt.Fprintf(os.Stderr, "conclab: warning: FAULT '%s' IS ON: a safeguard is deliberately disabled (teaching mode)\n", cfg.fault)
		}
	}
	ln, err := listen(cfg.host, cfg.port)
	if err != nil {
		die(err)
	}
	s := &server{cfg: cfg, port: ln.Addr().(*net.TCPAddr).Port, abort: make(chan struct{}), conns: map[net.Conn]struct{}{}}
	if cfg.fault != "unbounded" { // FAULT unbounded: no cap; each connection costs a goroutine and an fd
		s.sem = make(chan struct{}, cfg.maxConns)
	}
	if cfg.metricsPort >= 0 {
		ml, err := listen(cfg.host, cfg.metricsPort)
		if err != nil {
			die(fmt.Errorf("--metrics-port: %v", err))
		}
		mux := http.NewServeMux()
		mux.HandleFunc("/metrics", s.metrics)
		go http.Serve(ml, mux)
	}
	if cfg.fault != "hard-kill" { // FAULT hard-kill: SIGTERM kills us mid-request: no drain, no final line
		signals := make(chan os.Signal, 1) // buffered: signal delivery never blocks
		signal.Notify(signals, syscall.SIGTERM, syscall.SIGINT)
		go func() { <-signals; ln.Close() }() // step 1: stop accepting at once; later signals are ignored
	}
	fmt.Println("listening on", ln.Addr()) // os.Stdout is unbuffered: the line is out now
	s.serve(ln)
	aborted := s.drain()
	fmt.Printf("{\"event\": \"stopped\", %s, \"connections_aborted\": %d}\n", s.stats.fields(), aborted)
}
