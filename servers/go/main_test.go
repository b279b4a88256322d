package main

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"regexp"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

// With CONCLAB_GO_TEST_MAIN=1 the test binary is the server itself: the
// end-to-end tests run it as a child process, as the Python launcher runs
// the real binary.
func TestMain(m *testing.M) {
	if os.Getenv("CONCLAB_GO_TEST_MAIN") == "1" {
		main()
		os.Exit(0)
	}
	os.Exit(m.Run())
}

// ---------------------------------------------------------------- helpers

// syncBuffer is a log destination the test can read while the server writes.
type syncBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// newTestServer is main() without signals: a server on 127.0.0.1, port 0.
// serving says whether it accepts (else tests hand it connections by start).
func newTestServer(t testing.TB, serving bool, args ...string) (*server, *syncBuffer) {
	t.Helper()
	cfg, err := parseFlags(args)
	if err != nil {
		t.Fatal(err)
	}
	ln, err := listen("127.0.0.1", 0)
	if err != nil {
		t.Fatal(err)
	}
	logs := &syncBuffer{}
	s := newServer(cfg, ln, logs)
	served := make(chan error, 1)
	if serving {
		go func() { served <- s.serve() }()
	} else {
		served <- nil
	}
	t.Cleanup(func() { // after the test's own cleanups (LIFO): its clients are closed by now
		s.stop()
		if err := <-served; err != nil {
			t.Errorf("serve: %v", err)
		}
		s.drain()
	})
	return s, logs
}

func dial(t testing.TB, s *server) net.Conn {
	t.Helper()
	c, err := net.Dial("tcp", s.ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// startPipe hands the server one end of a net.Pipe, as if accepted.
func startPipe(t testing.TB, s *server) net.Conn {
	t.Helper()
	server, client := net.Pipe()
	if !s.admit() {
		t.Fatal("not admitted")
	}
	s.start(server)
	t.Cleanup(func() { client.Close() })
	return client
}

func encode(op byte, payload []byte) []byte {
	b := make([]byte, 5+len(payload))
	binary.BigEndian.PutUint32(b, uint32(len(payload)+1))
	b[4] = op
	copy(b[5:], payload)
	return b
}

func recvFrame(t testing.TB, c net.Conn) (byte, []byte) {
	t.Helper()
	c.SetReadDeadline(time.Now().Add(10 * time.Second))
	var head [5]byte
	if _, err := io.ReadFull(c, head[:]); err != nil {
		t.Fatal(err)
	}
	payload := make([]byte, binary.BigEndian.Uint32(head[:4])-1)
	if _, err := io.ReadFull(c, payload); err != nil {
		t.Fatal(err)
	}
	return head[4], payload
}

func request(t testing.TB, c net.Conn, op byte, payload []byte) (byte, []byte) {
	t.Helper()
	if _, err := c.Write(encode(op, payload)); err != nil {
		t.Fatal(err)
	}
	return recvFrame(t, c)
}

func waitUntil(t testing.TB, what string, ok func() bool) {
	t.Helper()
	for end := time.Now().Add(10 * time.Second); !ok(); time.Sleep(5 * time.Millisecond) {
		if time.Now().After(end) {
			t.Fatalf("timed out waiting until %s", what)
		}
	}
}

// ---------------------------------------------------------------- 13: options

func TestOptionsAreRefusedWithConfigPyMessages(t *testing.T) {
	finite := func(name string) string {
		return "--" + name + " must be a finite number of seconds, at most 1000000"
	}
	for _, tc := range []struct {
		args string
		want string // "" : accepted
	}{
		{"", ""},
		{"--idle-timeout 1000000 --frame-timeout 1000000 --drain-timeout 1000000", ""},
		{"--idle-timeout 1e10", finite("idle-timeout")},
		{"--idle-timeout inf", finite("idle-timeout")},
		{"--idle-timeout 1000000.5", finite("idle-timeout")},
		{"--idle-timeout nan", "--idle-timeout must be positive"}, // Python: nan > 0 is False
		{"--idle-timeout 0", "--idle-timeout must be positive"},
		{"--idle-timeout -inf", "--idle-timeout must be positive"},
		{"--frame-timeout inf", finite("frame-timeout")},
		{"--frame-timeout 0", "--frame-timeout must be positive"},
		{"--drain-timeout inf", finite("drain-timeout")},
		{"--drain-timeout -inf", finite("drain-timeout")},
		{"--drain-timeout nan", finite("drain-timeout")},
		{"--drain-timeout 1e300", finite("drain-timeout")},
		{"--drain-timeout -1", "--drain-timeout must not be negative"},
		{"--drain-timeout 0", ""},
		{"--port -1", "--port must be in 0..65535"},
		{"--port 65536", "--port must be in 0..65535"},
		{"--max-conns 0", "--max-conns must be at least 1"},
		{"--max-frame 0", "--max-frame must be in 1..4294967295"},
		{"--max-frame 4294967296", "--max-frame must be in 1..4294967295"},
		{"--max-frame 4294967295", "--max-buffered must be at least --max-frame (one maximal frame must fit)"},
		{"--max-frame 4294967295 --max-buffered 4294967295", ""},
		{"--max-frame 1000 --max-buffered 999", "--max-buffered must be at least --max-frame (one maximal frame must fit)"},
		{"--max-frame 1000 --max-buffered 1000", ""},
		{"--metrics-port -1", "--metrics-port must be in 0..65535"},
		{"--metrics-port 65536", "--metrics-port must be in 0..65535"},
		{"--metrics-port 0", ""},
		{"--rate-limit 0", "--rate-limit must be positive"},
		{"--rate-limit -2", "--rate-limit must be positive"},
		{"--rate-limit nan", "--rate-limit must be positive"},
		{"--rate-limit 0.5", ""},
		{"--burst 0", "--burst must be at least 1"},
		{"--burst 0.5 --rate-limit 10", "--burst must be at least 1"},
		{"--burst 2", ""}, // without --rate-limit: accepted and unused, as in Python
		{"--workers 0", "--workers must be at least 1"},
		{"--workers 4 --dispatch request", ""},
		{"--gomaxprocs 0", "--gomaxprocs must be at least 1"},
		{"--gomaxprocs -3", "--gomaxprocs must be at least 1"},
		{"--gomaxprocs 1", ""},
		{"--protocol udp", "--protocol must be framed or raw"},
		{"--rate-limit-mode drop", "--rate-limit-mode must be delay or reject"},
		{"--fault oops", "--fault must be none, leak, no-deadline, unbounded or hard-kill"},
		{"--dispatch thread", "--dispatch must be connection or request"},
		{"stray", "unexpected argument stray"},
		// the shared rate limit (docs/ratelimit.md)
		{"--rate-limit 5 --rate-limit-store redis://127.0.0.1:6379/2 --rate-limit-scope client --rate-limit-on-error deny", ""},
		{"--rate-limit 5 --rate-limit-store memory --rate-limit-scope client", ""},
		{"--rate-limit 5 --rate-limit-store redis://", `--rate-limit-store "redis://": a host and a port are needed: expected redis://HOST:PORT[/DB]`},
		{"--rate-limit 5 --rate-limit-store redis://127.0.0.1", `--rate-limit-store "redis://127.0.0.1": a host and a port are needed: expected redis://HOST:PORT[/DB]`},
		{"--rate-limit 5 --rate-limit-store disk", "--rate-limit-store must be memory or redis://HOST:PORT[/DB]"},
		{"--rate-limit 5 --rate-limit-scope foo", "--rate-limit-scope must be connection or client"},
		{"--rate-limit 5 --rate-limit-on-error maybe", "--rate-limit-on-error must be allow or deny"},
		{"--rate-limit-store redis://127.0.0.1:6379", "--rate-limit-store needs --rate-limit"},
		{"--rate-limit-scope client", "--rate-limit-scope needs --rate-limit"},
		{"--rate-limit 5 --rate-limit-on-error deny", "--rate-limit-on-error needs --rate-limit-store redis://HOST:PORT (memory never fails)"},
		// the first failing check in validate()'s order names the problem
		{"--gomaxprocs 0 --port -1 --idle-timeout inf", "--port must be in 0..65535"},
		{"--idle-timeout inf --frame-timeout 0", "--frame-timeout must be positive"},
		{"--max-frame 0 --drain-timeout inf", finite("drain-timeout")},
	} {
		_, err := parseFlags(strings.Fields(tc.args))
		got := ""
		if err != nil {
			got = err.Error()
		}
		if got != tc.want {
			t.Errorf("%q: got %q, want %q", tc.args, got, tc.want)
		}
	}
}

func TestOptionDefaultsMatchConfigPy(t *testing.T) {
	c, err := parseFlags(nil)
	if err != nil {
		t.Fatal(err)
	}
	if c.rate != 0 || c.metricsPort != -1 || c.gomaxprocs != 0 || c.burst != 1 || c.idle != 60 || c.frame != 10 || c.drain != 5 ||
		c.maxBuffered != 256<<20 || c.rateStore != "memory" || c.rateScope != "connection" || c.rateOnError != "allow" || c.redis != nil {
		t.Errorf("defaults: %+v", c)
	}
	if c, _ = parseFlags([]string{"--rate-limit", "20"}); c.burst != 20 {
		t.Errorf("burst defaults to the rate: got %v", c.burst)
	}
	if c, _ = parseFlags([]string{"--rate-limit", "0.5"}); c.burst != 1 {
		t.Errorf("burst is at least one token: got %v", c.burst)
	}
}

func TestSecondsSaturatesInsteadOfOverflowing(t *testing.T) {
	for _, s := range []float64{1e10, 1e300} {
		if d := seconds(s); d != time.Duration(1<<63-1) {
			t.Errorf("seconds(%v) = %v", s, d)
		}
	}
	if d := seconds(maxTimeout); d != maxTimeout*time.Second {
		t.Errorf("seconds(maxTimeout) = %v", d)
	}
}

// runMain runs the test binary as the server with these options.
func runMain(args ...string) *exec.Cmd {
	cmd := exec.Command(os.Args[0], args...)
	cmd.Env = append(os.Environ(), "CONCLAB_GO_TEST_MAIN=1", "CONCLAB_WARNED=1")
	return cmd
}

func TestBadOptionIsOneLineOnStderrAndExitStatus2(t *testing.T) {
	for _, args := range [][]string{{"--idle-timeout", "inf"}, {"--idle-timeout", "1e10"}, {"--gomaxprocs", "0"}, {"--burst", "0"},
		{"--rate-limit", "1", "--rate-limit-store", "redis://"}, {"--rate-limit-scope", "client"}} {
		cmd := runMain(args...)
		var stdout, stderr bytes.Buffer
		cmd.Stdout, cmd.Stderr = &stdout, &stderr
		err := cmd.Run()
		var exit *exec.ExitError
		if !errors.As(err, &exit) || exit.ExitCode() != 2 {
			t.Errorf("%v: want exit status 2, got %v", args, err)
		}
		if lines := strings.Split(strings.TrimSuffix(stderr.String(), "\n"), "\n"); len(lines) != 1 ||
			!strings.HasPrefix(lines[0], "conclab: error: --") || stdout.Len() != 0 {
			t.Errorf("%v: stdout %q, stderr %q", args, stdout.String(), stderr.String())
		}
	}
}

// ---------------------------------------------------------------- 12: no allocation per request

// echoRoundTrips measures allocations and time per ECHO round trip of 64
// bytes. The client side allocates nothing either (its frame and reply
// buffer are made once), so what AllocsPerRun counts is the server's.
func echoRoundTrip(tb testing.TB, c net.Conn) func() {
	req := encode(opEcho, bytes.Repeat([]byte{'x'}, 64))
	resp := make([]byte, len(req))
	return func() {
		if _, err := c.Write(req); err != nil {
			tb.Fatal(err)
		}
		if _, err := io.ReadFull(c, resp); err != nil {
			tb.Fatal(err)
		}
	}
}

func TestEchoRoundTripAllocatesNothing(t *testing.T) {
	s, _ := newTestServer(t, true)
	for name, c := range map[string]net.Conn{"loopback": dial(t, s), "pipe": startPipe(t, s)} {
		roundTrip := echoRoundTrip(t, c)
		for i := 0; i < 100; i++ { // warm up: pool, bufio, the first deadlines
			roundTrip()
		}
		if n := testing.AllocsPerRun(2000, roundTrip); n != 0 {
			t.Errorf("%s: %v allocations per ECHO round trip, want 0", name, n)
		}
	}
}

func BenchmarkEchoRoundTripLoopback(b *testing.B) {
	s, _ := newTestServer(b, true)
	benchmarkRoundTrip(b, dial(b, s))
}

func BenchmarkEchoRoundTripPipe(b *testing.B) {
	s, _ := newTestServer(b, false)
	benchmarkRoundTrip(b, startPipe(b, s))
}

func benchmarkRoundTrip(b *testing.B, c net.Conn) {
	roundTrip := echoRoundTrip(b, c)
	roundTrip()
	b.ReportAllocs()
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		roundTrip()
	}
}

// replayConn is a client in memory that sends one 64-byte ECHO per Read,
// `left` times, then EOF, and swallows the replies: serving it costs only
// the server's own work per request, no system call.
type replayConn struct {
	net.Conn // not called: nil
	frame    []byte
	left     int
}

func (c *replayConn) Read(b []byte) (int, error) {
	if c.left == 0 {
		return 0, io.EOF
	}
	c.left--
	return copy(b, c.frame), nil
}

func (c *replayConn) Write(b []byte) (int, error)      { return len(b), nil }
func (c *replayConn) SetReadDeadline(time.Time) error  { return nil }
func (c *replayConn) SetWriteDeadline(time.Time) error { return nil }

// BenchmarkServeFramedEcho is what our code costs per ECHO (ns/op): the
// framing, clocks, deadlines and counters of serveFramed, without the kernel.
func BenchmarkServeFramedEcho(b *testing.B) {
	s, _ := newTestServer(b, false)
	conn := &replayConn{frame: encode(opEcho, bytes.Repeat([]byte{'x'}, 64)), left: b.N}
	b.ReportAllocs()
	b.ResetTimer()
	if err := s.serveFramed(s.newPeer(conn)); !errors.Is(err, io.EOF) {
		b.Fatal(err)
	}
}

func TestLazyDeadlineFiresEarlyThenRearms(t *testing.T) {
	var d lazyDeadline
	now := time.Now()
	if !d.need(now.Add(time.Second)) || d.need(now.Add(2*time.Second)) || !d.need(now.Add(time.Millisecond)) {
		t.Error("need: arm when none is, or when due is earlier than what is armed, and only then")
	}
	timeout := &net.OpError{Op: "read", Err: os.ErrDeadlineExceeded}
	if !d.early(timeout, time.Now().Add(time.Hour)) || !d.need(now.Add(2*time.Second)) {
		t.Error("an expiry before due is early, and due is armed next")
	}
	if d.early(timeout, time.Now().Add(-time.Millisecond)) || d.early(io.EOF, time.Now().Add(time.Hour)) {
		t.Error("an expiry at or after due, or another error, is not early")
	}
}

// The idle clock moves with every request while the armed deadline stays:
// it fires early, the handler re-arms and reads on; the connection lives.
func TestChattyClientOutlivesManyIdleDeadlines(t *testing.T) {
	s, _ := newTestServer(t, true, "--idle-timeout", "0.3")
	c := dial(t, s)
	for end := time.Now().Add(time.Second); time.Now().Before(end); time.Sleep(30 * time.Millisecond) {
		if op, p := request(t, c, opPing, []byte("hi")); op != opPong || string(p) != "hi" {
			t.Fatalf("got %x %q", op, p)
		}
	}
	if op, p := recvFrame(t, c); op != opError || string(p) != "idle timeout" { // and silence still ends it
		t.Fatalf("got %x %q", op, p)
	}
	if n := s.stats.idleTimeouts.Load(); n != 1 {
		t.Errorf("idle_timeouts = %d", n)
	}
}

func TestFrameTimeoutStillCutsADribbler(t *testing.T) {
	s, _ := newTestServer(t, true, "--idle-timeout", "30", "--frame-timeout", "0.3")
	c := dial(t, s)
	request(t, c, opPing, nil) // the idle deadline is armed 30 s out; the frame deadline must come earlier
	frame := encode(opEcho, []byte("slow"))
	began := time.Now()
	c.Write(frame[:3])
	if op, p := recvFrame(t, c); op != opError || string(p) != "frame timeout" {
		t.Fatalf("got %x %q", op, p)
	}
	if took := time.Since(began); took < 250*time.Millisecond || took > 3*time.Second {
		t.Errorf("frame timeout after %v", took)
	}
	waitUntil(t, "counted", func() bool { return s.stats.frameTimeouts.Load() == 1 })
}

// The clocks are read lazily (see peer): a frame answered from input already
// buffered must still restart the idle clock when it ends, not when the
// input was read. Here a WORK that waits 400 ms arrives with the start of
// the next frame; the idle clock restarts after the WORK, so the idle
// timeout (0.3 s) comes 0.3 s after its reply, not at once.
func TestIdleClockRestartsAfterABufferedFrame(t *testing.T) {
	s, _ := newTestServer(t, true, "--idle-timeout", "0.3")
	c := dial(t, s)
	work := encode(opWork, []byte{0, 6, 0x1a, 0x80, 0, 0, 0, 0}) // io_us 400000, cpu_us 0
	c.Write(append(work, encode(opEcho, []byte("next"))[:3]...))
	if op, _ := recvFrame(t, c); op != opWork {
		t.Fatalf("got %x", op)
	}
	replied := time.Now()
	if op, p := recvFrame(t, c); op != opError || string(p) != "idle timeout" {
		t.Fatalf("got %x %q", op, p)
	}
	if took := time.Since(replied); took < 200*time.Millisecond || took > 3*time.Second {
		t.Errorf("idle timeout %v after the WORK reply, want ~300ms", took)
	}
}

// ---------------------------------------------------------------- 11: no big buffer kept

func TestRecycleKeepsOnlySmallBuffers(t *testing.T) {
	for size, pooled := range map[int]bool{0: true, 4 << 10: true, 64 << 10: true, 64<<10 + 1: false, 2 << 20: false} {
		b := make([]byte, 10, size+10)[10:]
		if got := recycle(&b); got != pooled {
			t.Errorf("recycle(cap %d) = %v", cap(b), got)
		}
	}
	if recycle(nil) {
		t.Error("recycle(nil)")
	}
}

// readPayload grows the buffer with the bytes that came, and at most to n.
func TestReadPayloadGrowsOnlyWithTheBytesReceived(t *testing.T) {
	const mib = 1 << 20
	buf, err := readPayload(strings.NewReader("ten bytes!"), nil, mib) // announces 1 MiB, sends 10 bytes
	if err != io.EOF || len(buf) != 10 || cap(buf) > minPayloadBuf {
		t.Errorf("len %d cap %d err %v", len(buf), cap(buf), err)
	}
	buf, err = readPayload(bytes.NewReader(make([]byte, 2*mib)), nil, mib)
	if err != nil || len(buf) != mib || cap(buf) != mib { // bytes.Buffer.ReadFrom ended at 2 MiB
		t.Errorf("len %d cap %d err %v", len(buf), cap(buf), err)
	}
}

// The finding itself, measured in the heap rather than RSS: clients that
// each sent one 1 MiB ECHO and then idle must not hold 1-2 MiB apiece.
func TestIdleConnectionsKeepNoBigBuffer(t *testing.T) {
	const clients, mib = 32, 1 << 20
	s, _ := newTestServer(t, true)
	payload, reply := bytes.Repeat([]byte{'p'}, mib-1), make([]byte, mib+4)
	req := encode(opEcho, payload)
	conns := make([]net.Conn, clients)
	before := heapAfterGC()
	for i := range conns {
		conns[i] = dial(t, s)
		if _, err := conns[i].Write(req); err != nil {
			t.Fatal(err)
		}
		if _, err := io.ReadFull(conns[i], reply); err != nil || !bytes.Equal(reply, req) {
			t.Fatalf("echo %d: %v", i, err)
		}
	}
	grown := int64(heapAfterGC()) - int64(before)
	t.Logf("heap grew %.1f MiB for %d idle clients after a 1 MiB ECHO each", float64(grown)/mib, clients)
	if grown > 8*mib { // before: 2 MiB per client, 64 MiB
		t.Errorf("heap grew %.1f MiB", float64(grown)/mib)
	}
	for i := 0; i < 1000; i++ { // and what sits in the pool is small
		b := payloadPool.Get().(*[]byte)
		if cap(*b) > maxPooledPayload {
			t.Fatalf("pooled buffer of %d bytes", cap(*b))
		}
	}
	runtime.KeepAlive(conns)
}

func heapAfterGC() uint64 {
	var m runtime.MemStats
	runtime.GC()
	runtime.GC()
	runtime.ReadMemStats(&m)
	return m.HeapAlloc
}

// ---------------------------------------------------------------- 14: write failures

// brokenConn takes the first `accept` bytes written, then fails every write.
type brokenConn struct {
	net.Conn
	accept int
}

func (c *brokenConn) SetWriteDeadline(time.Time) error { return nil }

func (c *brokenConn) Write(b []byte) (int, error) {
	n := len(b)
	if n > c.accept {
		n = c.accept
	}
	c.accept -= n
	if n < len(b) {
		return n, syscall.EPIPE
	}
	return n, nil
}

func TestBytesOutCountsOnlyWhatWasWritten(t *testing.T) {
	s, _ := newTestServer(t, false)
	p := s.newPeer(&brokenConn{accept: 7})
	if err := p.reply(opEcho, bytes.Repeat([]byte{'x'}, 100)); err != nil { // queued in p.w, nothing written yet
		t.Fatal(err)
	}
	if n := s.stats.bytesOut.Load(); n != 0 {
		t.Errorf("bytes_out %d after queueing", n)
	}
	if err := p.w.Flush(); !errors.Is(err, syscall.EPIPE) {
		t.Errorf("flush: %v", err)
	}
	if n := s.stats.bytesOut.Load(); n != 7 {
		t.Errorf("bytes_out %d, want the 7 bytes written", n)
	}
	if err := p.reply(opEcho, []byte("more")); err == nil { // bufio's error is sticky: reply reports it
		t.Error("reply after a failed write succeeded")
	}
	big := bytes.Repeat([]byte{'y'}, 4096) // larger than p.w: written directly, still counted by what went
	p2 := s.newPeer(&brokenConn{accept: 1000})
	if err := p2.reply(opEcho, big); err == nil {
		t.Error("reply of a big payload to a broken conn succeeded")
	}
	if n := s.stats.bytesOut.Load(); n != 1007 {
		t.Errorf("bytes_out %d, want 1007", n)
	}
}

// A client that sends requests and never reads a reply: on each path a
// reply can be stuck (the flush before a read, before a WORK wait, before
// STATS) the connection ends after --idle-timeout, counted once, as an idle
// timeout, with no bytes counted as sent (net.Pipe buffers nothing).
func TestStalledWriteIsOneIdleTimeoutOnEveryPath(t *testing.T) {
	echo := encode(opEcho, []byte("a"))
	for _, tc := range []struct {
		path   string
		frames [][]byte
		args   []string
	}{
		{"flush before a read", [][]byte{echo}, nil},
		{"flush before a WORK wait", [][]byte{echo, encode(opWork, make([]byte, 8))}, nil},
		{"flush before STATS", [][]byte{echo, encode(opStats, nil)}, nil},
		{"flush before a rate-limit delay", [][]byte{echo, echo}, []string{"--rate-limit", "1"}},
		{"reply larger than p.w", [][]byte{encode(opEcho, make([]byte, 3000))}, nil},
	} {
		t.Run(tc.path, func(t *testing.T) {
			s, _ := newTestServer(t, false, append([]string{"--idle-timeout", "0.2"}, tc.args...)...)
			server, c := net.Pipe()
			defer c.Close()
			linger := &lingerRecorder{Conn: server, seconds: -1}
			s.admit()
			s.start(linger)
			began := time.Now()
			if _, err := c.Write(bytes.Join(tc.frames, nil)); err != nil {
				t.Fatal(err)
			}
			waitUntil(t, "the connection ends", func() bool { return s.stats.active.Load() == 0 })
			if took := time.Since(began); took < 150*time.Millisecond || took > 3*time.Second {
				t.Errorf("ended after %v", took)
			}
			if it, ft, out := s.stats.idleTimeouts.Load(), s.stats.frameTimeouts.Load(), s.stats.bytesOut.Load(); it != 1 || ft != 0 || out != 0 {
				t.Errorf("idle_timeouts %d frame_timeouts %d bytes_out %d", it, ft, out)
			}
			if linger.get() != 0 {
				t.Error("not reset: SetLinger(0) was not called before Close")
			}
		})
	}
}

// lingerRecorder remembers the last SetLinger (a TCP connection's reset switch).
type lingerRecorder struct {
	net.Conn
	mu      sync.Mutex
	seconds int
}

func (c *lingerRecorder) SetLinger(sec int) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.seconds = sec
	return nil
}

func (c *lingerRecorder) get() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.seconds
}

// Over TCP: a client that floods ECHOs and reads nothing is dropped after
// --idle-timeout; bytes_out is what the kernel took, under what was asked.
// (Whether a FIN or an RST ends it cannot be told apart from the client here:
// closing a socket with unread input sends RST anyway.)
func TestCloggedReaderIsResetAndCounted(t *testing.T) {
	s, _ := newTestServer(t, true, "--idle-timeout", "0.3")
	c := dial(t, s)
	req := encode(opEcho, make([]byte, 64<<10))
	sent := 0
	c.SetWriteDeadline(time.Now().Add(5 * time.Second))
	for {
		if _, err := c.Write(req); err != nil {
			break // the server stopped reading us, then reset us
		}
		sent += len(req)
	}
	waitUntil(t, "the connection ends", func() bool { return s.stats.active.Load() == 0 })
	if it, out := s.stats.idleTimeouts.Load(), s.stats.bytesOut.Load(); it != 1 || out >= int64(sent) || out == 0 {
		t.Errorf("idle_timeouts %d, bytes_out %d of %d asked", it, out, sent)
	}
}

// ---------------------------------------------------------------- 15: accept errors

func TestAcceptBackoffDoublesFrom5msTo1s(t *testing.T) {
	var b acceptBackoff
	want := []time.Duration{5, 10, 20, 40, 80, 160, 320, 640, 1000, 1000}
	for i, w := range want {
		d, first := b.failed()
		if d != w*time.Millisecond || first != (i == 0) {
			t.Errorf("failure %d: %v first=%v, want %v", i+1, d, first, w*time.Millisecond)
		}
	}
	b.succeeded()
	if d, first := b.failed(); d != 5*time.Millisecond || !first {
		t.Errorf("after a success: %v first=%v", d, first)
	}
}

// fakeListener's Accept returns these results in turn, then blocks until Close.
type fakeListener struct {
	net.Listener // the real one, for Addr
	results      []any
	mu           sync.Mutex
	closed       chan struct{}
	once         sync.Once
}

func (l *fakeListener) Accept() (net.Conn, error) {
	l.mu.Lock()
	if len(l.results) > 0 {
		r := l.results[0]
		l.results = l.results[1:]
		l.mu.Unlock()
		if conn, ok := r.(net.Conn); ok {
			return conn, nil
		}
		return nil, r.(error)
	}
	l.mu.Unlock()
	<-l.closed
	return nil, net.ErrClosed
}

func (l *fakeListener) Close() error {
	l.once.Do(func() { close(l.closed) })
	return nil
}

func acceptErr(errno syscall.Errno) error {
	return &net.OpError{Op: "accept", Net: "tcp", Err: os.NewSyscallError("accept4", errno)}
}

func TestAcceptLoopBacksOffLogsOncePerEpisodeAndStopsOnPermanentError(t *testing.T) {
	s, logs := newTestServer(t, false)
	conn, client := net.Pipe()
	defer client.Close()
	emfile := acceptErr(syscall.EMFILE)
	s.ln = &fakeListener{Listener: s.ln, closed: make(chan struct{}),
		results: []any{emfile, emfile, emfile, conn, acceptErr(syscall.ENFILE), emfile, acceptErr(syscall.EBADF)}}
	began := time.Now()
	err := s.serve()
	took := time.Since(began)
	if !errors.Is(err, syscall.EBADF) {
		t.Errorf("serve: %v, want EBADF", err)
	}
	if min := (5 + 10 + 20 + 5 + 10) * time.Millisecond; took < min || took > min+time.Second {
		t.Errorf("serve took %v, want about %v of backoff", took, min)
	}
	if lines := strings.Count(logs.String(), "conclab: accept: "); lines != 2 {
		t.Errorf("%d accept log lines, want one per episode (2):\n%s", lines, logs)
	}
	if n := s.stats.total.Load(); n != 1 {
		t.Errorf("%d connections admitted, want 1", n)
	}
}

func TestStopEndsTheBackoffAndServeReturnsNil(t *testing.T) {
	s, _ := newTestServer(t, false)
	results := make([]any, 100)
	for i := range results {
		results[i] = acceptErr(syscall.EMFILE)
	}
	s.ln = &fakeListener{Listener: s.ln, closed: make(chan struct{}), results: results}
	done := make(chan error, 1)
	go func() { done <- s.serve() }()
	time.Sleep(700 * time.Millisecond) // in the 640 ms wait (5+10+...+320 ms went before it)
	began := time.Now()
	s.stop()
	select {
	case err := <-done:
		if err != nil || time.Since(began) > 300*time.Millisecond {
			t.Errorf("serve returned %v after %v", err, time.Since(began))
		}
	case <-time.After(5 * time.Second):
		t.Fatal("serve did not return after stop")
	}
}

func TestPermanentAcceptErrors(t *testing.T) {
	for err, permanent := range map[error]bool{
		acceptErr(syscall.EMFILE): false, acceptErr(syscall.ENFILE): false, acceptErr(syscall.ENOBUFS): false,
		acceptErr(syscall.ENOMEM): false, acceptErr(syscall.ECONNABORTED): false, acceptErr(syscall.EPROTO): false,
		acceptErr(syscall.EBADF): true, acceptErr(syscall.EINVAL): true, acceptErr(syscall.ENOTSOCK): true,
		errors.New("not the kernel's"): true,
	} {
		if got := permanentAcceptError(err); got != permanent {
			t.Errorf("%v: permanent = %v", err, got)
		}
	}
}

// ---------------------------------------------------------------- 16: metrics

func TestMetricsServerHasTimeouts(t *testing.T) {
	s, _ := newTestServer(t, false)
	srv := s.metricsServer()
	for name, d := range map[string]time.Duration{"ReadHeaderTimeout": srv.ReadHeaderTimeout,
		"ReadTimeout": srv.ReadTimeout, "WriteTimeout": srv.WriteTimeout, "IdleTimeout": srv.IdleTimeout} {
		if d <= 0 || d > time.Minute {
			t.Errorf("%s = %v", name, d)
		}
	}
	if srv.MaxHeaderBytes <= 0 || srv.MaxHeaderBytes > 1<<20 {
		t.Errorf("MaxHeaderBytes = %d", srv.MaxHeaderBytes)
	}
}

var metricsLine = regexp.MustCompile(`^metrics on 127\.0\.0\.1:(\d+)\n$`)

func TestMetricsPortIsReportedServedAndShutDown(t *testing.T) {
	s, _ := newTestServer(t, false)
	var out bytes.Buffer
	srv, err := s.startMetrics("127.0.0.1", 0, &out)
	if err != nil {
		t.Fatal(err)
	}
	m := metricsLine.FindStringSubmatch(out.String())
	if m == nil || m[1] == "0" {
		t.Fatalf("reported %q", out.String())
	}
	url := "http://127.0.0.1:" + m[1] + "/metrics"
	resp, err := http.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	for _, want := range []string{`conclab_connections_active{backend="go"} 0`, "conclab_handler_panics_total", "conclab_close_wait_connections"} {
		if !strings.Contains(string(body), want) {
			t.Errorf("no %q in\n%s", want, body)
		}
	}
	stopMetrics(srv)
	if _, err := net.DialTimeout("tcp", "127.0.0.1:"+m[1], time.Second); err == nil {
		t.Error("metrics port still accepts after stopMetrics")
	}
}

func TestMetricsEndpointDropsASlowloris(t *testing.T) {
	s, _ := newTestServer(t, false)
	var out bytes.Buffer
	srv, err := s.startMetrics("127.0.0.1", 0, &out)
	if err != nil {
		t.Fatal(err)
	}
	defer stopMetrics(srv)
	c, err := net.Dial("tcp", strings.TrimSpace(strings.TrimPrefix(out.String(), "metrics on ")))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.Write([]byte("GET /metrics HTTP/1.1\r\nHost: x\r\n")) // and never the blank line
	began := time.Now()
	c.SetReadDeadline(time.Now().Add(10 * time.Second))
	io.Copy(io.Discard, c) // returns when the server closes the connection
	if took := time.Since(began); took > metricsReadHeaderTimeout+2*time.Second {
		t.Errorf("half a request held the connection %v", took)
	}
}

// ---------------------------------------------------------------- 17: panics, the cap, keepalive

// panicConn panics in Read: a bug somewhere under the handler.
type panicConn struct{ net.Conn }

func (panicConn) Read([]byte) (int, error) { panic("boom") }

func TestHandlerPanicClosesOnlyItsConnection(t *testing.T) {
	s, logs := newTestServer(t, true)
	bystander := dial(t, s)
	request(t, bystander, opPing, nil)
	server, client := net.Pipe()
	defer client.Close()
	if !s.admit() {
		t.Fatal("not admitted")
	}
	s.start(panicConn{server})
	waitUntil(t, "the panic is recovered", func() bool { return s.panics.Load() == 1 })
	waitUntil(t, "its connection is released", func() bool { return s.stats.active.Load() == 1 })
	if _, err := client.Read(make([]byte, 1)); err != io.EOF { // closed: the pipe's other end sees EOF
		t.Errorf("client read: %v", err)
	}
	if op, p := request(t, bystander, opEcho, []byte("still here")); op != opEcho || string(p) != "still here" {
		t.Errorf("bystander got %x %q", op, p)
	}
	log := logs.String()
	if strings.Count(log, "\n") != 1 || !strings.Contains(log, "conclab: panic serving pipe: boom (at conclab/goserver.panicConn.Read main_test.go:") {
		t.Errorf("log: %q", log)
	}
}

func TestAdmitNeverExceedsTheCap(t *testing.T) {
	const limit, workers, tries = 3, 8, 20000
	s, _ := newTestServer(t, false, "--max-conns", fmt.Sprint(limit))
	var highest atomic.Int64
	var wg sync.WaitGroup
	for w := 0; w < workers; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; i < tries; i++ {
				if !s.admit() {
					continue
				}
				for n := s.stats.active.Load(); n > highest.Load(); {
					if highest.CompareAndSwap(highest.Load(), n) {
						break
					}
				}
				runtime.Gosched()
				s.stats.active.Add(-1) // release's part for the cap
			}
		}()
	}
	wg.Wait()
	if h := highest.Load(); h > limit || h < 1 {
		t.Errorf("active reached %d with --max-conns %d", h, limit)
	}
	if a, sum := s.stats.active.Load(), s.stats.total.Load()+s.stats.rejected.Load(); a != 0 || sum != workers*tries {
		t.Errorf("active %d, admitted + rejected %d of %d", a, sum, workers*tries)
	}
	if s.stats.rejected.Load() == 0 {
		t.Error("8 workers on 3 places: some must have been rejected")
	}
}

func TestUnboundedFaultHasNoCap(t *testing.T) {
	s, _ := newTestServer(t, false, "--max-conns", "1", "--fault", "unbounded")
	for i := 0; i < 5; i++ {
		if !s.admit() {
			t.Fatal("rejected under --fault unbounded")
		}
	}
}

func TestAcceptedConnectionsHaveNoKeepAlive(t *testing.T) {
	ln, err := listen("127.0.0.1", 0)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		if c, err := net.Dial("tcp", ln.Addr().String()); err == nil {
			defer c.Close()
			time.Sleep(time.Second)
		}
	}()
	conn, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	raw, err := conn.(*net.TCPConn).SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	keepalive := -1
	raw.Control(func(fd uintptr) {
		keepalive, err = syscall.GetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_KEEPALIVE)
	})
	if err != nil || keepalive != 0 {
		t.Errorf("SO_KEEPALIVE = %d (%v), want 0", keepalive, err)
	}
}

// ---------------------------------------------------------------- end to end

// The binary's lines: `listening on` first on stdout, `metrics on` on
// stderr, and after SIGTERM the final JSON line and exit status 0.
func TestServerLinesAndGracefulStop(t *testing.T) {
	cmd := runMain("--port", "0", "--metrics-port", "0")
	var stderr syncBuffer
	cmd.Stderr = &stderr
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer cmd.Process.Kill()
	lines := bufio.NewScanner(stdout)
	if !lines.Scan() || !strings.HasPrefix(lines.Text(), "listening on 127.0.0.1:") {
		t.Fatalf("first stdout line %q", lines.Text())
	}
	address := strings.TrimPrefix(lines.Text(), "listening on ")
	if !metricsLine.MatchString(stderr.String()) {
		t.Errorf("stderr %q, want one `metrics on` line", stderr.String())
	}
	c, err := net.Dial("tcp", address)
	if err != nil {
		t.Fatal(err)
	}
	if op, p := request(t, c, opEcho, []byte("e2e")); op != opEcho || string(p) != "e2e" {
		t.Errorf("got %x %q", op, p)
	}
	c.Close()
	cmd.Process.Signal(syscall.SIGTERM)
	if !lines.Scan() {
		t.Fatal("no final line")
	}
	var final map[string]any
	if err := json.Unmarshal(lines.Bytes(), &final); err != nil || final["event"] != "stopped" || final["requests_total"] != 1.0 {
		t.Errorf("final line %q (%v)", lines.Text(), err)
	}
	if err := cmd.Wait(); err != nil {
		t.Errorf("exit: %v", err)
	}
}

// ---------------------------------------------------------------- the buffer budget

func TestReserveNeverExceedsTheBudget(t *testing.T) {
	const budget, frame, workers, tries = 3000, 1000, 8, 20000
	s, _ := newTestServer(t, false, "--max-buffered", fmt.Sprint(budget), "--max-frame", fmt.Sprint(frame))
	var highest, refused atomic.Int64
	var wg sync.WaitGroup
	for w := 0; w < workers; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			p := &peer{}
			for i := 0; i < tries; i++ {
				if !s.reserve(p, frame) {
					refused.Add(1)
					continue
				}
				for n := s.stats.buffered.Load(); n > highest.Load(); {
					if highest.CompareAndSwap(highest.Load(), n) {
						break
					}
				}
				runtime.Gosched()
				s.unreserve(p)
				s.unreserve(p) // nothing twice
			}
		}()
	}
	wg.Wait()
	if h := highest.Load(); h > budget || h < frame {
		t.Errorf("buffered reached %d with --max-buffered %d", h, budget)
	}
	if b := s.stats.buffered.Load(); b != 0 || refused.Load() == 0 {
		t.Errorf("buffered %d after all gave back; %d refused (8 workers on 3 frames: some must be)", b, refused.Load())
	}
}

func TestBudgetRefusesPastItAndIsGivenBackOnEveryEnding(t *testing.T) {
	s, _ := newTestServer(t, true, "--max-buffered", "2000", "--max-frame", "1000", "--frame-timeout", "0.3")
	partial := encode(opEcho, bytes.Repeat([]byte("p"), 999))[:600]
	holding := func() net.Conn {
		c := dial(t, s)
		before := s.stats.buffered.Load()
		c.Write(partial)
		waitUntil(t, "the frame is reserved", func() bool { return s.stats.buffered.Load() == before+1000 })
		return c
	}
	a, b := holding(), holding()
	c := dial(t, s)
	c.Write(append(encode(opPing, []byte("1")), partial[:100]...))
	if op, payload := recvFrame(t, c); op != opPong || string(payload) != "1" {
		t.Fatalf("the frame before the refused one: %x %q", op, payload)
	}
	if op, payload := recvFrame(t, c); op != opError || string(payload) != "server busy" {
		t.Fatalf("past the budget: %x %q", op, payload)
	}
	if s.stats.bufferRejections.Load() != 1 || s.stats.protocolErrors.Load() != 0 {
		t.Errorf("buffer_rejections %d, protocol_errors %d", s.stats.bufferRejections.Load(), s.stats.protocolErrors.Load())
	}
	a.Write(encode(opEcho, bytes.Repeat([]byte("p"), 999))[600:]) // completed and answered: given back
	if op, payload := recvFrame(t, a); op != opEcho || len(payload) != 999 {
		t.Fatalf("the admitted frame: %x, %d bytes", op, len(payload))
	}
	waitUntil(t, "the answered frame's bytes are back", func() bool { return s.stats.buffered.Load() == 1000 })
	b.(*net.TCPConn).SetLinger(0)
	b.Close() // reset mid-frame
	waitUntil(t, "the reset frame's bytes are back", func() bool { return s.stats.buffered.Load() == 0 })
	d := holding() // the frame timeout ends it mid-frame
	if op, payload := recvFrame(t, d); op != opError || string(payload) != "frame timeout" {
		t.Fatalf("mid-frame timeout: %x %q", op, payload)
	}
	waitUntil(t, "the timed-out frame's bytes are back", func() bool { return s.stats.buffered.Load() == 0 })
}

// A frame in progress holds what it was sent: the payload arrives in chunks,
// not in doubling buffers whose discarded halves add up to the frame again.
func TestAPartialFrameAllocatesAboutWhatArrived(t *testing.T) {
	const mib = 1 << 20
	sent := make([]byte, mib-4096)
	r, w := io.Pipe()
	go func() {
		w.Write(sent)
		w.CloseWithError(io.ErrUnexpectedEOF) // the peer stops short of its 1 MiB
	}()
	var before, after runtime.MemStats
	runtime.ReadMemStats(&before)
	_, err := readPayload(r, nil, mib)
	runtime.ReadMemStats(&after)
	if err != io.ErrUnexpectedEOF {
		t.Fatalf("err %v", err)
	}
	if grown := after.TotalAlloc - before.TotalAlloc; grown > mib+mib/8 {
		t.Errorf("allocated %.2f MiB reading %.2f MiB of a frame", float64(grown)/mib, float64(len(sent))/mib)
	}
}
