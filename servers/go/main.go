// Command conclab-go is the reference backend of conclab: the lab's echo server
// written the way a Go interviewer expects a TCP server to be written.
//
//   - one goroutine per connection, released by `defer` on every path, with a
//     recover() per connection as net/http has: a handler that panics loses
//     its connection, not the process (an unrecovered panic in any goroutine
//     kills the whole program, defers or not);
//   - read deadlines for the idle and frame timeouts (no slowloris), and a
//     write deadline for a client that stops reading, both armed lazily:
//     a timer is moved only when it would otherwise fire too late;
//   - one atomic counter as the connection cap (--max-conns), taken by
//     compare-and-swap, so it never goes over, even for an instant;
//   - signal.Notify + sync.WaitGroup for the graceful drain;
//   - payload buffers borrowed from a sync.Pool for one frame, and only small
//     ones given back: an idle connection holds no payload buffer at all;
//   - a global budget of buffered request bytes (--max-buffered), reserved
//     by compare-and-swap before a frame's payload is read, and the payload
//     read in chunks as it arrives: no frame is allocated up front;
//   - sync/atomic for the counters, and no allocation per request;
//   - a token bucket (--rate-limit) per connection, touched only by its
//     connection's goroutine, so it needs no lock; or per client, in a map
//     under a mutex; or in Redis, shared by every process (ratelimit.go);
//   - an accept loop that backs off (5 ms doubling to 1 s) when the process
//     is out of descriptors, as net/http's Server.Serve does;
//   - Prometheus metrics (--metrics-port) from an http.Server with timeouts,
//     CLOSE_WAIT monitoring included (metrics.go).
//
// The wire protocol, controls and shutdown are the lab's contract
// (docs/protocol.md); servers/session.py is the Python twin of serveFramed,
// and config.go checks the options as servers/config.py does.
// Standard library only.
package main

import (
	"bufio"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log"
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
	"unsafe"
)

// Every frame is: u32 big-endian length (= 1 + len(payload)), u8 op, payload.
const (
	opEcho, opPing, opPong, opWork, opStats, opError = 0x01, 0x02, 0x03, 0x04, 0x05, 0xFF
	maxPing                                          = 64 // bytes of PING id
)

var (
	busyFrame   = append([]byte{0, 0, 0, 12, opError}, "server busy"...) // ERROR for connections over the cap
	rateLimited = []byte("rate limited")
)

// stats is shared by every goroutine: lock-free atomic counters.
type stats struct {
	active, total, rejected, requests, bytesIn, bytesOut     atomic.Int64
	idleTimeouts, frameTimeouts, protocolErrors, rateLimited atomic.Int64
	bufferRejections, buffered                               atomic.Int64 // buffered: a gauge, the budget in use
	store                                                    storeCounters
	facts                                                    string // the controls STATS and the final line show, as JSON members
}

// each visits the counters in the order STATS prints them, with their help text.
func (st *stats) each(f func(name, help string, v *atomic.Int64)) {
	f("connections_active", "Connections open now.", &st.active)
	f("connections_total", "Connections accepted under the cap.", &st.total)
	f("connections_rejected", "Connections refused over --max-conns.", &st.rejected)
	f("requests_total", "Requests answered.", &st.requests)
	f("bytes_in", "Bytes received.", &st.bytesIn)
	f("bytes_out", "Bytes sent (taken by the kernel, not just queued).", &st.bytesOut)
	f("idle_timeouts", "Connections closed by the idle timeout (no request, or no reply read).", &st.idleTimeouts)
	f("frame_timeouts", "Connections closed by the frame timeout.", &st.frameTimeouts)
	f("protocol_errors", "Connections closed for breaking the protocol.", &st.protocolErrors)
	f("rate_limited", "Requests refused with ERROR \"rate limited\": over the rate in reject mode, or the store failed under --rate-limit-on-error deny.", &st.rateLimited)
	f("buffer_rejections", "Connections refused a frame over --max-buffered (ERROR \"server busy\").", &st.bufferRejections)
	f("buffered_bytes", "Request bytes held and not yet answered, reserved from --max-buffered.", &st.buffered)
	f("rate_store_calls", "Round trips to the --rate-limit-store (EVALSHA sent).", &st.store.calls)
	f("rate_store_errors", "Requests given the --rate-limit-on-error verdict (store down, slow or skipped while reconnecting).", &st.store.errors)
}

// fields renders the counters as JSON members, spaced like Python's json.dumps.
func (st *stats) fields() string {
	b := fmt.Sprintf(`"backend": "go", "pid": %d`, os.Getpid())
	st.each(func(name, _ string, v *atomic.Int64) { b += fmt.Sprintf(`, "%s": %d`, name, v.Load()) })
	return b + st.facts
}

// factsOf is the controls STATS shows (as Python's backends show theirs): the
// rate limit's store, where it is (redis://HOST:PORT, no database), and scope.
func factsOf(cfg *config) string {
	return fmt.Sprintf(`, "rate_limit_store": %q, "rate_limit_scope": %q`, cfg.storeLabel(), cfg.rateScope)
}

type server struct {
	cfg      *config
	ln       net.Listener
	port     int // ours, to find our sockets in /proc/net/tcp
	stats    stats
	panics   atomic.Int64 // handlers that panicked (recovered): /metrics only
	log      *log.Logger  // stderr, one line per event, "conclab: " first
	wg       sync.WaitGroup
	quit     chan struct{} // closed by stop: wakes the accept loop's backoff
	stopOnce sync.Once
	abort    chan struct{} // closed at the drain deadline: wakes handlers that sleep
	mu       sync.Mutex
	conns    map[net.Conn]struct{} // open connections, for the drain (and the leak's reference)
	budget   int64                 // --max-buffered; MaxInt64 under --fault unbounded (counted, never enforced)
	store    *redisBucket          // --rate-limit-store redis://...; nil: memory
	clients  *clientBuckets        // --rate-limit-scope client with the memory store
}

func newServer(cfg *config, ln net.Listener, logTo io.Writer) *server {
	s := &server{cfg: cfg, ln: ln, port: ln.Addr().(*net.TCPAddr).Port, log: log.New(logTo, "conclab: ", 0),
		quit: make(chan struct{}), abort: make(chan struct{}), conns: map[net.Conn]struct{}{},
		budget: budgetOf(cfg), clients: newClientBuckets(cfg)}
	s.store = newStore(cfg, &s.stats.store)
	s.stats.facts = factsOf(cfg)
	return s
}

// budgetOf is the buffer budget a server enforces: --max-buffered, or none
// under --fault unbounded (FAULT unbounded: no cap on connections or buffered bytes).
func budgetOf(cfg *config) int64 {
	if cfg.fault == "unbounded" {
		return math.MaxInt64
	}
	return cfg.maxBuffered
}

// stop is step 1 of the drain: stop accepting at once (the signal handler calls it).
func (s *server) stop() {
	s.stopOnce.Do(func() { close(s.quit); s.ln.Close() })
}

// ---------------------------------------------------------------- accepting

// Accept backs off as net/http's Server.Serve does: when accept fails (EMFILE
// and friends: out of descriptors or memory) the listener stays readable, so
// retrying at once is a busy loop. Wait 5 ms, doubling up to 1 s, and start
// again from 5 ms after the next success.
const minAcceptDelay, maxAcceptDelay = 5 * time.Millisecond, time.Second

type acceptBackoff struct{ delay time.Duration } // zero: the last accept succeeded

// failed returns how long to wait after a failed accept, and whether this
// failure starts a new episode (the only one that is logged: under EMFILE an
// accept fails every few milliseconds for as long as it lasts).
func (b *acceptBackoff) failed() (delay time.Duration, first bool) {
	first = b.delay == 0
	switch {
	case first:
		b.delay = minAcceptDelay
	case 2*b.delay < maxAcceptDelay:
		b.delay *= 2
	default:
		b.delay = maxAcceptDelay
	}
	return b.delay, first
}

func (b *acceptBackoff) succeeded() { b.delay = 0 }

// permanentAcceptError: no later accept can succeed on this listener (it is
// not a listening socket any more), or the error is not the kernel's and we
// cannot tell. Everything else accept(2) reports (out of descriptors or
// memory, a connection aborted before we took it, ...) is worth a retry.
func permanentAcceptError(err error) bool {
	var errno syscall.Errno
	if !errors.As(err, &errno) {
		return true
	}
	return errno == syscall.EBADF || errno == syscall.EINVAL || errno == syscall.ENOTSOCK || errno == syscall.EFAULT
}

// serve accepts until stop closes the listener (then nil: the drain follows),
// or until accept fails for good.
func (s *server) serve() error {
	var backoff acceptBackoff
	for {
		conn, err := s.ln.Accept()
		if errors.Is(err, net.ErrClosed) {
			return nil
		} else if err != nil && permanentAcceptError(err) {
			return fmt.Errorf("accept: %w", err)
		} else if err != nil {
			delay, first := backoff.failed()
			if first {
				s.log.Printf("accept: %v (retrying every %v..%v until it works; logged once)", err, minAcceptDelay, maxAcceptDelay)
			}
			s.sleep(delay)
			continue
		}
		backoff.succeeded()
		if !s.admit() {
			s.refuse(conn)
			continue
		}
		s.start(conn)
	}
}

// sleep waits d, or less if stop is called meanwhile.
func (s *server) sleep(d time.Duration) {
	timer := time.NewTimer(d)
	defer timer.Stop()
	select {
	case <-timer.C:
	case <-s.quit:
	}
}

// admit takes a place under --max-conns, or counts a rejection. The cap is
// tracked one way only: stats.active, the gauge STATS reports. Checking it
// and then adding 1 would be two steps, and two accepts racing between them
// would both get in; CompareAndSwap adds 1 only if no one changed the count
// since we read it (else we read again), so active never exceeds the cap.
func (s *server) admit() bool {
	for {
		n := s.stats.active.Load()
		if n >= int64(s.cfg.maxConns) && s.cfg.fault != "unbounded" { // FAULT unbounded: no cap; each connection costs a goroutine and an fd
			s.stats.rejected.Add(1)
			return false
		}
		if s.stats.active.CompareAndSwap(n, n+1) {
			s.stats.total.Add(1)
			return true
		}
	}
}

// refuse answers a connection over the cap and closes it.
func (s *server) refuse(conn net.Conn) {
	if s.cfg.protocol == "framed" {
		conn.SetWriteDeadline(time.Now().Add(time.Second))
		conn.Write(busyFrame)
	}
	conn.Close()
}

// start hands an admitted connection to its own goroutine.
func (s *server) start(conn net.Conn) {
	s.mu.Lock()
	s.conns[conn] = struct{}{}
	s.mu.Unlock()
	s.wg.Add(1) // before `go`, so the drain cannot miss it
	go s.handle(conn)
}

// ---------------------------------------------------------------- one connection

var errPanicked = errors.New("the handler panicked")

// handle owns one connection for its whole life: one goroutine per connection.
func (s *server) handle(conn net.Conn) {
	defer s.wg.Done()
	var err error
	// The article's `defer conn.Close()`: it runs when handle returns and
	// while a panic unwinds through it, but a panic that nothing recovers
	// then kills the process, every other connection with it. So:
	defer func() { s.release(conn, err) }()
	defer s.survive(conn, &err) // runs first (defers are LIFO): recovers, then release closes
	p := s.newPeer(conn)
	if s.cfg.protocol == "raw" {
		err = s.serveRaw(p)
	} else {
		err = s.serveFramed(p)
	}
}

// survive is the handler's recover(), as net/http's conn.serve has: a panic
// (a bug) closes its own connection, is counted and logged in one line, and
// every other connection carries on. It must be deferred itself: recover
// stops a panic only when called directly by a deferred function.
func (s *server) survive(conn net.Conn, err *error) {
	if v := recover(); v != nil {
		s.panics.Add(1)
		*err = errPanicked
		s.log.Printf("panic serving %v: %v (at %s); connection closed", conn.RemoteAddr(), v, panicSite())
	}
}

// panicSite names the function and line that panicked: the first frame past
// the runtime's own panic machinery.
func panicSite() string {
	pc := make([]uintptr, 32)
	frames := runtime.CallersFrames(pc[:runtime.Callers(3, pc)])
	for inPanic := false; ; {
		frame, more := frames.Next()
		if inPanic && !strings.HasPrefix(frame.Function, "runtime.") {
			return fmt.Sprintf("%s %s:%d", frame.Function, frame.File[strings.LastIndex(frame.File, "/")+1:], frame.Line)
		}
		inPanic = inPanic || frame.Function == "runtime.gopanic"
		if !more {
			return "unknown"
		}
	}
}

// release closes a finished connection and gives its place back.
func (s *server) release(conn net.Conn, err error) {
	if s.cfg.fault == "leak" && errors.Is(err, io.EOF) {
		// FAULT leak: the peer closed and we return without Close(). The socket
		// sits in CLOSE_WAIT, its fd stays open (s.conns still refers to it, so
		// no finalizer closes it) and its place is never given back: enough of
		// these and everyone gets "server busy".
		return
	}
	if !errors.Is(err, errPeerNotReading) { // (a stalled one was reset already)
		s.deliver(conn)
	}
	conn.Close()
	s.mu.Lock()
	delete(s.conns, conn)
	s.mu.Unlock()
	s.stats.active.Add(-1)
}

// deliverCheck is how often a closing connection looks whether its last replies left.
const deliverCheck = 50 * time.Millisecond

// deliver waits, before a close, for the replies the kernel still holds to
// reach the peer: a close with unsent data would leave the socket behind
// (FIN-WAIT-1) holding them for a peer that may never read. They get what any
// write gets, --idle-timeout without progress; then the connection is reset.
func (s *server) deliver(conn net.Conn) {
	if s.cfg.fault == "no-deadline" {
		return
	}
	idle, left, last := seconds(s.cfg.idle), unsent(conn), time.Now()
	for left > 0 {
		time.Sleep(deliverCheck)
		now := unsent(conn)
		if now < left {
			last = time.Now()
		}
		if left = now; left > 0 && time.Since(last) >= idle {
			reset(conn)
			return
		}
	}
}

// Per-connection buffers: 1 KiB each instead of bufio's 4 KiB default saves
// 6 KiB per idle connection; small requests and pipelined replies still fit,
// and a larger payload bypasses the buffer (bufio reads/writes it directly).
const readBufSize, writeBufSize = 1024, 1024

// peer is a connection as its handler sees it: the handler reads from p.r and
// writes to p.w, two small buffers. Below them, p.Read and p.Write are the
// only code that touches the socket, so that is where the deadlines are armed
// and the bytes counted. bufio.Reader calls p.Read only when its buffered
// input is used up: a frame that is already buffered costs no system call and
// no deadline. p.Read first flushes the replies queued so far, so replies to
// pipelined requests coalesce into one write, and no reply is left unsent
// while we wait for the client.
//
// The clock is read once per p.Read (not three times per request), and by
// the monotonic clock alone (see timeNow): a time.Now costs as much as the
// rest of our per-request work. A finished frame only marks the idle clock
// for a restart, a frame that has begun only marks its frame clock to start;
// the next p.Read takes one reading for both, and lends it to the flush it
// starts (p.now). Between the marks and that reading we only work on input
// already buffered (no wait, no sleep, no write), so the clocks start the
// same instant as if read at the marks, give or take microseconds.
type peer struct {
	conn                  net.Conn
	st                    *stats
	r                     *bufio.Reader // reads from p.Read
	w                     *bufio.Writer // writes to p.Write
	timed                 bool          // arm deadlines (off under --fault no-deadline)
	idle, frame           time.Duration
	idleStart, frameStart time.Time    // frameStart is zero between frames and until a frame's first p.Read
	restartIdle, inFrame  bool         // marks for the next clock reading: a frame ended; a frame has begun
	now                   time.Time    // p.Read's clock reading while its flush runs; zero otherwise
	born                  time.Time    // time.Now() at the start: timeNow counts from it
	readArmed, writeArmed lazyDeadline // what the connection's deadlines are set to now
	head                  [5]byte      // reply header scratch, so replies allocate nothing
	held                  int64        // budget bytes reserved for the frame being read or answered
}

func (s *server) newPeer(conn net.Conn) *peer {
	p := &peer{conn: conn, st: &s.stats, timed: s.cfg.fault != "no-deadline", // FAULT no-deadline: a silent, dribbling or non-reading client holds its goroutine and fd forever
		idle: seconds(s.cfg.idle), frame: seconds(s.cfg.frame), born: time.Now()}
	p.idleStart = p.born
	p.r, p.w = bufio.NewReaderSize(p, readBufSize), bufio.NewWriterSize(p, writeBufSize)
	return p
}

// A lazyDeadline is the value one of a connection's deadlines is set to.
// Setting a deadline is a timer operation (and net.Pipe allocates a timer
// for each), and the idle deadline moves with every request. So a deadline
// is moved only when it must come earlier; one left earlier than needed may
// fire early, os.ErrDeadlineExceeded before the real deadline: then the
// caller arms the real one and retries. That costs one extra wakeup per
// --idle-timeout, not a timer operation per request.
type lazyDeadline time.Time // zero: none armed

// need reports whether the deadline must be set to due (and records it).
func (d *lazyDeadline) need(due time.Time) bool {
	if armed := time.Time(*d); armed.IsZero() || due.Before(armed) {
		*d = lazyDeadline(due)
		return true
	}
	return false
}

// early reports whether err is the deadline firing before due: retry, and
// need(due) will arm due.
func (d *lazyDeadline) early(err error, due time.Time) bool {
	if err != nil && errors.Is(err, os.ErrDeadlineExceeded) && time.Now().Before(due) {
		*d = lazyDeadline{}
		return true
	}
	return false
}

// readDeadline is when a read must have returned: idle start + idle timeout
// or, while a frame is partly received, frame start + frame timeout if
// earlier. A read past it fails with os.ErrDeadlineExceeded: no goroutine
// waits forever on a client.
func (p *peer) readDeadline() time.Time {
	due := p.idleStart.Add(p.idle)
	if end := p.frameStart.Add(p.frame); !p.frameStart.IsZero() && end.Before(due) {
		due = end
	}
	return due
}

// Read reads the socket for bufio.Reader (see peer).
func (p *peer) Read(b []byte) (int, error) {
	p.now = p.timeNow()
	p.startClocks()
	err := p.w.Flush()
	p.now = time.Time{}
	if err != nil {
		return 0, err
	}
	for {
		due := p.readDeadline()
		if p.timed && p.readArmed.need(due) {
			p.conn.SetReadDeadline(due)
		}
		n, err := p.conn.Read(b)
		p.st.bytesIn.Add(int64(n))
		if n > 0 || !p.timed || !p.readArmed.early(err, due) {
			return n, err
		}
	}
}

// startClocks starts the clocks marked since the last reading (see peer) at p.now.
func (p *peer) startClocks() {
	if p.restartIdle {
		p.idleStart, p.restartIdle = p.now, false
	}
	if p.inFrame && p.frameStart.IsZero() {
		p.frameStart = p.now
	}
}

// clock is the time now: p.Read's reading while its flush runs, else a new one.
func (p *peer) clock() time.Time {
	if p.now.IsZero() {
		return p.timeNow()
	}
	return p.now
}

// timeNow is time.Now() for our clocks and deadlines at half the cost: the
// start time plus the monotonic time elapsed since, one vDSO call where
// time.Now makes two (wall and monotonic). Every use compares or subtracts
// times by their monotonic readings, so nothing else can tell.
func (p *peer) timeNow() time.Time {
	return p.born.Add(time.Since(p.born))
}

// errPeerNotReading: a write to the socket made no progress for --idle-timeout.
var errPeerNotReading = errors.New("the peer read none of our replies for --idle-timeout")

// Write writes to the socket for bufio.Writer, and is the only place bytes_out
// is counted: bytes the kernel took, not bytes queued in p.w. Each write has
// --idle-timeout to complete, so a client that stops reading our replies is
// dropped, not waited for forever (what SO_SNDTIMEO does in the Python thread
// backends). bufio.Writer keeps the first error for good: every later Write
// and Flush on p.w returns it.
func (p *peer) Write(b []byte) (int, error) {
	var due time.Time
	if p.timed {
		due = p.clock().Add(p.idle)
	}
	// Unsent bytes at the last passed deadline (asked only then, never per write) and bytes
	// written since that reading.
	written, queued, pushed := 0, -1, 0
	for {
		if p.timed && p.writeArmed.need(due) {
			p.conn.SetWriteDeadline(due)
		}
		n, err := p.conn.Write(b[written:])
		written += n
		pushed += n
		p.st.bytesOut.Add(int64(n))
		if err == nil || !p.timed {
			return written, err
		} else if p.writeArmed.early(err, due) {
			continue
		} else if errors.Is(err, os.ErrDeadlineExceeded) {
			// The deadline counts from the last progress, not from the start of the write: a
			// peer that reads slowly keeps its connection. Progress is bytes that left our send
			// queue for the peer: fewer waiting than at the last deadline plus what we added
			// since. Bytes written are not progress by themselves: the kernel wakes a blocked
			// writer only once a good part of the send buffer is free, but the retry after a
			// deadline takes whatever little room the buffer has (or has grown), peer or not.
			// The first deadline of a write only takes the reading: one more period to compare.
			// Where the kernel cannot be asked, a write that took bytes is progress.
			now := unsent(p.conn)
			if (now < 0 && n > 0) || (now >= 0 && (queued < 0 || now < queued+pushed)) {
				queued, pushed, due, p.writeArmed = now, 0, time.Now().Add(p.idle), lazyDeadline{}
				continue
			}
			err = errPeerNotReading
		}
		return written, err
	}
}

// siocoutqnsd is Linux's SIOCOUTQNSD ioctl: bytes in the send queue not yet sent;
// tcpEstablished and tcpCloseWait are the TCP states in which they can still leave.
const (
	siocoutqnsd    = 0x894B
	tcpEstablished = 1
	tcpCloseWait   = 8
)

// unsent is how many bytes the kernel holds for conn and has not sent yet, or -1
// where that cannot be asked (not a TCP socket, not Linux) or nothing more can be
// sent (the connection is no longer established: a reset leaves its count behind).
func unsent(conn net.Conn) int {
	sc, ok := conn.(syscall.Conn)
	if !ok {
		return -1
	}
	raw, err := sc.SyscallConn()
	if err != nil {
		return -1
	}
	n := -1
	raw.Control(func(fd uintptr) {
		var info [8]byte // struct tcp_info begins with tcpi_state
		size := uint32(len(info))
		if _, _, e := syscall.Syscall6(syscall.SYS_GETSOCKOPT, fd, syscall.IPPROTO_TCP, syscall.TCP_INFO,
			uintptr(unsafe.Pointer(&info[0])), uintptr(unsafe.Pointer(&size)), 0); e != 0 ||
			(info[0] != tcpEstablished && info[0] != tcpCloseWait) {
			return
		}
		var v int32
		if _, _, e := syscall.Syscall(syscall.SYS_IOCTL, fd, siocoutqnsd, uintptr(unsafe.Pointer(&v))); e == 0 {
			n = int(v)
		}
	})
	return n
}

// reply queues one frame in p.w: sent when we next need input (see peer), or
// earlier if p.w fills up. Its error is p.w's, the first write that failed.
func (p *peer) reply(op byte, payload []byte) error {
	binary.BigEndian.PutUint32(p.head[:4], uint32(len(payload)+1))
	p.head[4] = op
	if _, err := p.w.Write(p.head[:]); err != nil {
		return err
	}
	_, err := p.w.Write(payload)
	return err
}

// reset makes the coming Close send RST, not FIN: the connection is abandoned.
func reset(conn net.Conn) {
	if tcp, ok := conn.(interface{ SetLinger(int) error }); ok {
		tcp.SetLinger(0)
	}
}

// A protocolError is a broken rule; its text is the reason in the ERROR frame.
type protocolError string

func (e protocolError) Error() string { return string(e) }

var errAborted = errors.New("aborted by the drain deadline")

// errOverBudget refuses a frame that does not fit in the buffer budget. It is
// answered as a protocol error is (the replies owed first, then ERROR, close)
// but counted in buffer_rejections: the server is busy, the peer did no wrong.
var errOverBudget = protocolError("server busy")

// The buffer budget (--max-buffered, docs/protocol.md 3) bounds the request
// bytes all connections hold and have not answered yet. A frame that is not
// already whole in the connection's read buffer (readBufSize: per-connection
// memory, answered before the next read) reserves its length when its 4
// length bytes are in, before any of its payload is buffered: reserve takes it
// by compare-and-swap, so the total never goes over, even for an instant. The
// frame's bytes go back once its reply is queued, or when the connection
// ends mid-frame, whatever the reason (serveFramed: unreserve).
func (s *server) reserve(p *peer, n int64) bool {
	for {
		used := s.stats.buffered.Load()
		if used > s.budget-n {
			return false
		}
		if s.stats.buffered.CompareAndSwap(used, used+n) {
			p.held = n
			return true
		}
	}
}

// unreserve gives back what the connection's frame reserved (nothing twice).
func (s *server) unreserve(p *peer) {
	if p.held != 0 {
		s.stats.buffered.Add(-p.held)
		p.held = 0
	}
}

// Payload buffers are borrowed from payloadPool for one frame and given back
// once its reply is queued (bufio has copied it, or written it out). Only
// buffers up to maxPooledPayload go back: one 1 MiB ECHO must not leave a
// 1 MiB buffer behind, in a connection or in the pool. A connection waiting
// for its next frame holds no payload buffer at all, only its two bufio
// buffers. Get and Put of a *[]byte allocate nothing.
const minPayloadBuf, maxPooledPayload = 4 << 10, 64 << 10

var payloadPool = sync.Pool{New: func() any { b := make([]byte, 0, minPayloadBuf); return &b }}

// recycle gives a payload buffer back to the pool, if it is small enough.
func recycle(buf *[]byte) bool {
	if buf == nil || cap(*buf) > maxPooledPayload {
		return false // the garbage collector's now
	}
	*buf = (*buf)[:0]
	payloadPool.Put(buf)
	return true
}

// readFrame reads one whole frame and returns its op and its payload, in a
// buffer borrowed from payloadPool (the caller recycles it, error or not).
// The length is checked as soon as its 4 bytes arrive, and the buffer
// grows only as payload bytes arrive: a hostile length allocates nothing it
// has not been sent. A frame not already whole in the read buffer reserves
// its length from the buffer budget first (p.held; the caller gives it back).
func (s *server) readFrame(p *peer) (op byte, payload *[]byte, err error) {
	p.frameStart, p.inFrame = time.Time{}, false
	if _, err = p.r.Peek(1); err != nil { // between frames only the idle clock runs
		return 0, nil, err
	}
	p.inFrame = true // a frame has begun: its clock starts at the next reading
	head, err := p.r.Peek(4)
	if err != nil {
		return 0, nil, err
	}
	length := int64(binary.BigEndian.Uint32(head)) // copy it out: Peek's slice dies at the next read
	if length == 0 || length > int64(s.cfg.maxFrame) {
		return 0, nil, protocolError(fmt.Sprintf("frame length %d outside 1..%d", length, s.cfg.maxFrame))
	}
	if p.r.Buffered() < 4+int(length) && !s.reserve(p, length) {
		return 0, nil, errOverBudget
	}
	p.r.Discard(4)
	if op, err = p.r.ReadByte(); err != nil {
		return 0, nil, err
	}
	payload = payloadPool.Get().(*[]byte)
	*payload, err = readPayload(p.r, *payload, int(length-1))
	return op, payload, err
}

// readPayload reads n bytes into buf, growing it (doubling, from 4 KiB, but
// never past n) only when it is full and more bytes have arrived. Past
// maxPooledPayload the rest arrives in chunks of that size, joined once all n
// bytes are in: a frame in progress holds about what it was sent, and no
// garbage of earlier doublings (up to a frame's size again, for the garbage
// collector to find) while it waits for the rest. On an error the bytes read
// so far are dropped: the connection ends.
func readPayload(r io.Reader, buf []byte, n int) ([]byte, error) {
	first := n
	if first > maxPooledPayload {
		first = maxPooledPayload
	}
	buf = buf[:0]
	for len(buf) < first {
		if len(buf) == cap(buf) {
			size := 2 * cap(buf)
			if size > first {
				size = first
			}
			if size < minPayloadBuf {
				size = minPayloadBuf
			}
			buf = append(make([]byte, 0, size), buf...)
		}
		end := cap(buf)
		if end > first {
			end = first
		}
		m, err := r.Read(buf[len(buf):end])
		buf = buf[:len(buf)+m]
		if err != nil && len(buf) < first {
			return buf, err
		}
	}
	if first == n {
		return buf, nil
	}
	chunks, got := [][]byte{buf}, len(buf)
	for got < n {
		chunk, err := readChunk(r, min(n-got, maxPooledPayload))
		if err != nil {
			return buf, err
		}
		chunks, got = append(chunks, chunk), got+len(chunk)
	}
	whole := make([]byte, 0, n)
	for _, chunk := range chunks {
		whole = append(whole, chunk...)
	}
	return whole, nil
}

// readChunk reads exactly size bytes into a new buffer, or returns the error
// that stopped it (as Read gives it: io.EOF, a deadline, a reset).
func readChunk(r io.Reader, size int) ([]byte, error) {
	chunk := make([]byte, 0, size)
	for len(chunk) < size {
		m, err := r.Read(chunk[len(chunk):size])
		chunk = chunk[:len(chunk)+m]
		if err != nil && len(chunk) < size {
			return chunk, err
		}
	}
	return chunk, nil
}

func min(a, b int) int {
	if a < b {
		return a
	}
	return b
}

// serveFramed answers frames in order until the client leaves or breaks a rule.
func (s *server) serveFramed(p *peer) error {
	limit := s.newLimiter(p.conn)
	defer s.unreserve(p) // a panic too gives the budget back
	for {
		op, payload, err := s.readFrame(p)
		if err == nil {
			err = s.answer(p, op, *payload, limit)
		}
		recycle(payload) // before we wait for the next frame
		s.unreserve(p)   // its reply is queued, or the connection ends: the frame's bytes go back
		if err != nil {
			return s.fail(p, err)
		}
		// A complete frame restarts the idle clock, and so does its reply; we
		// read nothing in between, so restarting it once, now, is the same.
		p.restartIdle = true
	}
}

// answer checks one frame and queues its reply.
func (s *server) answer(p *peer, op byte, payload []byte, limit limiter) error {
	reply := op
	switch {
	case op == opPing && len(payload) > maxPing:
		return protocolError(fmt.Sprintf("PING payload is %d bytes, at most %d allowed", len(payload), maxPing))
	case op == opPing:
		reply = opPong
	case op == opWork && len(payload) < 8:
		return protocolError(fmt.Sprintf("WORK payload is %d bytes, needs at least 8 (io_us, cpu_us)", len(payload)))
	case op != opEcho && op != opWork && op != opStats:
		return protocolError(fmt.Sprintf("unknown op 0x%02x", op))
	}
	if limit != nil && op != opStats { // STATS is exempt: the lab must always see its counters
		v := limit()
		if !v.admitted { // reject mode over the rate, or a failed store under --rate-limit-on-error deny
			s.stats.rateLimited.Add(1)
			return p.reply(opError, rateLimited) // and the connection stays open
		} else if v.wait > 0 {
			if err := s.pause(p, v.wait); err != nil {
				return err
			}
		}
	}
	s.stats.requests.Add(1)
	switch op {
	case opWork: // wait io_us the Go way (the goroutine parks, its thread runs others), then compute cpu_us
		if err := s.pause(p, time.Duration(binary.BigEndian.Uint32(payload))*time.Microsecond); err != nil {
			return err
		}
		burn(time.Duration(binary.BigEndian.Uint32(payload[4:])) * time.Microsecond)
	case opStats:
		if err := p.w.Flush(); err != nil { // bytes_out counts sent bytes: send what came before first
			return err
		}
		payload = []byte("{" + s.stats.fields() + "}")
	}
	return p.reply(reply, payload)
}

// serveRaw is RFC 862 echo: whatever arrives goes back; no frames, no ERROR.
func (s *server) serveRaw(p *peer) error {
	for {
		p.restartIdle = true
		if _, err := p.r.Peek(1); err != nil {
			return s.fail(p, err)
		}
		data, _ := p.r.Peek(p.r.Buffered())
		s.stats.requests.Add(1)
		_, err := p.w.Write(data)
		p.r.Discard(len(data))
		if err != nil {
			return s.fail(p, err)
		}
	}
}

// fail counts why a connection ends and, in framed mode, tells the client.
// Other errors (EOF, reset, the drain) end it silently.
func (s *server) fail(p *peer, err error) error {
	var reason protocolError
	switch {
	case err == errOverBudget:
		s.stats.bufferRejections.Add(1)
		reason = errOverBudget
	case errors.As(err, &reason):
		s.stats.protocolErrors.Add(1)
	case errors.Is(err, errPeerNotReading):
		// A reply could not be sent for --idle-timeout, on any path (a reply
		// queued, the flush before a read, a WORK wait or a STATS). We count
		// it one way, as an idle timeout: the peer made no progress reading
		// for --idle-timeout. No ERROR frame: it cannot reach a peer that does
		// not read, and queued replies could not be flushed anyway. So the
		// connection is reset (RST) rather than closed with a FIN that would
		// sit behind them.
		s.stats.idleTimeouts.Add(1)
		reset(p.conn)
		return err
	case !errors.Is(err, os.ErrDeadlineExceeded):
		return err
	case !p.frameStart.IsZero() && time.Since(p.frameStart) >= p.frame:
		s.stats.frameTimeouts.Add(1)
		reason = "frame timeout"
	default:
		s.stats.idleTimeouts.Add(1)
		reason = "idle timeout"
	}
	if s.cfg.protocol == "framed" {
		p.reply(opError, []byte(reason)) // best effort: the connection closes either way
		if p.w.Flush() != nil {          // stalled behind replies the peer does not read
			reset(p.conn)
			return errPeerNotReading
		}
	}
	return err
}

// pause sends the replies already written, then sleeps d: errAborted if the
// drain deadline cut the sleep short.
func (s *server) pause(p *peer, d time.Duration) error {
	if err := p.w.Flush(); err != nil {
		return err
	}
	timer := time.NewTimer(d)
	defer timer.Stop()
	select {
	case <-timer.C:
		return nil
	case <-s.abort:
		return errAborted
	}
}

// burn computes for d: a busy loop. Go preempts it, so it delays no other connection.
func burn(d time.Duration) {
	for end := time.Now().Add(d); time.Now().Before(end); {
	}
}

// drain is the graceful shutdown of docs/protocol.md 4, once stop has closed
// the listener. CloseRead (shutdown SHUT_RD) makes each handler's next read
// return EOF after the input already received: complete frames are
// answered, idle connections close at once, busy ones after their reply. At
// the deadline what is left is reset. Returns how many were aborted.
func (s *server) drain() (aborted int) {
	s.mu.Lock()
	for conn := range s.conns {
		if tcp, ok := conn.(interface{ CloseRead() error }); ok {
			tcp.CloseRead()
		}
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
		reset(conn) // RST, not FIN: this is an abort
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

// listenConfig is how we listen. KeepAlive -1: accepted connections get no
// TCP keepalive. Go turns it on by default (a probe after 15 s of silence),
// which no Python backend does; off, a dead peer is found the same way in
// every backend: by --idle-timeout, and by clients that PING.
var listenConfig = net.ListenConfig{KeepAlive: -1}

// listen binds host:port (an IPv4 literal binds IPv4 only, as in Python).
func listen(host string, port int) (net.Listener, error) {
	network := "tcp"
	if ip := net.ParseIP(host); ip != nil && ip.To4() != nil {
		network = "tcp4"
	} else if ip != nil {
		network = "tcp6"
	}
	return listenConfig.Listen(context.Background(), network, net.JoinHostPort(host, strconv.Itoa(port)))
}

// errReason is the kernel's words for a failed listen: "address already in
// use", not "listen tcp4 127.0.0.1:80: bind: address already in use".
func errReason(err error) error {
	var sysErr *os.SyscallError
	if errors.As(err, &sysErr) {
		return sysErr.Err
	}
	return err
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
		die(fmt.Errorf("cannot listen on %s:%d: %v", cfg.host, cfg.port, errReason(err)))
	}
	s := newServer(cfg, ln, os.Stderr)
	var metrics *http.Server
	if cfg.metricsPort >= 0 {
		if metrics, err = s.startMetrics(cfg.host, cfg.metricsPort, os.Stderr); err != nil {
			die(err)
		}
	}
	if cfg.fault != "hard-kill" { // FAULT hard-kill: SIGTERM kills us mid-request: no drain, no final line
		signals := make(chan os.Signal, 1) // buffered: signal delivery never blocks
		signal.Notify(signals, syscall.SIGTERM, syscall.SIGINT)
		go func() { <-signals; s.stop() }() // step 1: stop accepting at once; later signals are ignored
	}
	fmt.Println("listening on", ln.Addr()) // os.Stdout is unbuffered: the line is out now
	status := 0
	if err := s.serve(); err != nil { // the listener is broken: serve who is here, then exit 1
		s.log.Printf("error: %v: no longer accepting", err)
		s.stop()
		status = 1
	}
	aborted := s.drain()
	if s.store != nil {
		s.store.close()
	}
	if metrics != nil {
		stopMetrics(metrics)
	}
	fmt.Printf("{\"event\": \"stopped\", %s, \"connections_aborted\": %d}\n", s.stats.fields(), aborted)
	os.Exit(status)
}
