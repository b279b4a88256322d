package main

import (
	"bufio"
	"encoding/json"
	"net"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// ---------------------------------------------------------------- a Redis that answers what it is told

// fakeRedis answers every EVALSHA with reply (an integer: the script's
// verdict) and records the keys asked for; any other command gets +OK. It
// checks the wiring (which key, how many calls, what a reply does), not
// the script: tests/test_rate_store_go.py runs the server against a real
// redis-server.
type fakeRedis struct {
	ln    net.Listener
	reply atomic.Int64
	mu    sync.Mutex
	keys  []string
}

func newFakeRedis(t *testing.T, reply int64) *fakeRedis {
	t.Helper()
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	f := &fakeRedis{ln: ln}
	f.reply.Store(reply)
	go f.serve()
	t.Cleanup(func() { ln.Close() })
	return f
}

func (f *fakeRedis) url() string { return "redis://" + f.ln.Addr().String() }

func (f *fakeRedis) serve() {
	for {
		conn, err := f.ln.Accept()
		if err != nil {
			return
		}
		go f.answer(conn)
	}
}

func (f *fakeRedis) answer(conn net.Conn) {
	defer conn.Close()
	r := bufio.NewReader(conn)
	for {
		cmd, err := readRESP(r)
		args, ok := cmd.([]interface{})
		if err != nil || !ok || len(args) == 0 {
			return
		}
		if name, _ := args[0].([]byte); string(name) == "EVALSHA" && len(args) > 3 {
			f.mu.Lock()
			f.keys = append(f.keys, string(args[3].([]byte)))
			f.mu.Unlock()
			conn.Write([]byte(":" + strconv.FormatInt(f.reply.Load(), 10) + "\r\n"))
		} else {
			conn.Write([]byte("+OK\r\n"))
		}
	}
}

func (f *fakeRedis) asked() []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]string(nil), f.keys...)
}

// stats asks the server for STATS on c and decodes it.
func statsOf(t *testing.T, c net.Conn) map[string]interface{} {
	t.Helper()
	op, payload := request(t, c, opStats, nil)
	var got map[string]interface{}
	if op != opStats || json.Unmarshal(payload, &got) != nil {
		t.Fatalf("STATS: op 0x%02x, %q", op, payload)
	}
	return got
}

// outcomes sends n ECHOs, alternating over conns, and counts the replies: ECHO, and ERROR "rate limited".
func outcomes(t *testing.T, conns []net.Conn, n int) (echoed, limited int) {
	t.Helper()
	for i := 0; i < n; i++ {
		switch op, payload := request(t, conns[i%len(conns)], opEcho, []byte("x")); {
		case op == opEcho:
			echoed++
		case op == opError && string(payload) == "rate limited":
			limited++
		default:
			t.Fatalf("request %d: op 0x%02x %q", i, op, payload)
		}
	}
	return echoed, limited
}

// ---------------------------------------------------------------- memory store

// Two connections of one client: with scope client they draw on one bucket
// (together: the burst), with scope connection on one each (twice the burst).
// The rate is so low that no token comes back during the test.
func TestScopeClientSharesOneBucketInMemory(t *testing.T) {
	for scope, want := range map[string]int{"client": 3, "connection": 6} {
		s, _ := newTestServer(t, true, "--rate-limit", "0.001", "--burst", "3", "--rate-limit-mode", "reject",
			"--rate-limit-scope", scope)
		conns := []net.Conn{dial(t, s), dial(t, s)}
		if echoed, limited := outcomes(t, conns, 8); echoed != want || limited != 8-want {
			t.Errorf("scope %s: %d echoed, %d rate limited; want %d echoed", scope, echoed, limited, want)
		}
		if got := s.stats.rateLimited.Load(); got != int64(8-want) {
			t.Errorf("scope %s: rate_limited %d", scope, got)
		}
	}
}

// A client bucket is dropped once it is full again, at the first request
// after the sweep interval; one still refilling is kept.
func TestClientBucketsAreDroppedWhenFullAgain(t *testing.T) {
	cfg, err := parseFlags([]string{"--rate-limit", "10", "--burst", "2", "--rate-limit-mode", "reject", "--rate-limit-scope", "client"})
	if err != nil {
		t.Fatal(err)
	}
	c := newClientBuckets(cfg)
	start := c.swept
	c.take("10.0.0.1", start) // full again 0.1 s later
	for i := 0; i < 40; i++ {
		c.take("10.0.0.2", start) // empty (2 tokens, then refused): full again 0.2 s later
	}
	if c.size() != 2 {
		t.Fatalf("%d buckets, want 2", c.size())
	}
	later := start.Add(clientSweepInterval)
	c.take("10.0.0.2", later.Add(-50*time.Millisecond)) // 0.95 s: refilled, one taken: full again at 1.05 s
	c.take("10.0.0.3", later)                           // the sweep: .1 full (dropped), .2 not yet
	c.mu.Lock()
	_, one := c.buckets["10.0.0.1"]
	_, two := c.buckets["10.0.0.2"]
	c.mu.Unlock()
	if one || !two || c.size() != 2 {
		t.Errorf("after the sweep: 10.0.0.1 kept %v, 10.0.0.2 kept %v, %d buckets", one, two, c.size())
	}
	if v := c.take("10.0.0.1", later); !v.admitted { // forgotten: a full bucket again
		t.Errorf("a dropped client starts with a full bucket: %+v", v)
	}
}

// ---------------------------------------------------------------- redis store

// With a redis store every request but STATS asks Redis once, under the
// key of its scope: the peer's address (both connections share it) or the
// connection's own id.
func TestRedisStoreAsksOncePerRequestUnderTheScopesKey(t *testing.T) {
	for _, scope := range []string{"client", "connection"} {
		redis := newFakeRedis(t, 1)
		s, _ := newTestServer(t, true, "--rate-limit", "5", "--rate-limit-mode", "reject",
			"--rate-limit-store", redis.url(), "--rate-limit-scope", scope)
		conns := []net.Conn{dial(t, s), dial(t, s)}
		if echoed, _ := outcomes(t, conns, 4); echoed != 4 {
			t.Fatalf("scope %s: %d of 4 echoed though Redis admits", scope, echoed)
		}
		stats := statsOf(t, conns[0])
		keys := redis.asked()
		if len(keys) != 4 || stats["rate_store_calls"] != 4.0 || stats["rate_store_errors"] != 0.0 {
			t.Fatalf("scope %s: keys %v, stats %v", scope, keys, stats)
		}
		if scope == "client" && (keys[0] != "conclab:bucket:127.0.0.1" || keys[1] != keys[0]) {
			t.Errorf("scope client: keys %v, want the peer's address for both connections", keys)
		}
		if scope == "connection" && (keys[0] == keys[1] || keys[0] != keys[2] || !strings.HasPrefix(keys[0], "conclab:bucket:"+hostName+":")) {
			t.Errorf("scope connection: keys %v, want one per connection", keys)
		}
		if stats["rate_limit_store"] != redis.url() || stats["rate_limit_scope"] != scope {
			t.Errorf("the controls in STATS: %v %v", stats["rate_limit_store"], stats["rate_limit_scope"])
		}
	}
}

// Redis's verdict is the reply: reject mode 0 is ERROR "rate limited" (the
// connection stays open), delay mode N is a reply N microseconds later.
func TestRedisVerdictsAreRepliedAsTheInMemoryOnes(t *testing.T) {
	redis := newFakeRedis(t, 0)
	s, _ := newTestServer(t, true, "--rate-limit", "5", "--rate-limit-mode", "reject", "--rate-limit-store", redis.url())
	c := dial(t, s)
	if echoed, limited := outcomes(t, []net.Conn{c}, 2); echoed != 0 || limited != 2 || s.stats.rateLimited.Load() != 2 {
		t.Fatalf("reject mode, Redis says 0: %d echoed, %d limited, rate_limited %d", echoed, limited, s.stats.rateLimited.Load())
	}
	delayed := newFakeRedis(t, 300_000) // 0.3 s
	s, _ = newTestServer(t, true, "--rate-limit", "5", "--rate-limit-store", delayed.url())
	c = dial(t, s)
	began := time.Now()
	if op, _ := request(t, c, opEcho, []byte("x")); op != opEcho {
		t.Fatalf("delay mode: op 0x%02x", op)
	}
	if took := time.Since(began); took < 300*time.Millisecond {
		t.Errorf("delay mode, Redis says wait 0.3 s: answered after %v", took)
	}
}

// Nobody at the store's address: --rate-limit-on-error decides, every such
// request is counted in rate_store_errors, none in rate_store_calls (no
// round trip was made), and the connection stays open either way.
func TestStoreDownGivesTheOnErrorVerdictCounted(t *testing.T) {
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	gone := "redis://" + ln.Addr().String()
	ln.Close() // a port nobody listens on: connections are refused
	for policy, want := range map[string]byte{"allow": opEcho, "deny": opError} {
		s, _ := newTestServer(t, true, "--rate-limit", "5", "--rate-limit-store", gone, "--rate-limit-on-error", policy)
		c := dial(t, s)
		for i := 0; i < 3; i++ {
			if op, payload := request(t, c, opEcho, []byte("x")); op != want {
				t.Fatalf("%s, request %d: op 0x%02x %q", policy, i, op, payload)
			}
		}
		if calls, errs := s.stats.store.calls.Load(), s.stats.store.errors.Load(); calls != 0 || errs != 3 {
			t.Errorf("%s: rate_store_calls %d, rate_store_errors %d; want 0 and 3", policy, calls, errs)
		}
	}
}

// After a failure one goroutine reconnects per interval; the others get the
// on-error verdict at once instead of each trying (and waiting) too.
func TestOneReconnectPerIntervalHoweverManyAsk(t *testing.T) {
	b, err := newRedisBucket("redis://127.0.0.1:1", 10, 1, "reject", "allow", nil)
	if err != nil {
		t.Fatal(err)
	}
	b.broke() // as after a failed call: the gate closes for one interval
	var dials atomic.Int64
	var wg sync.WaitGroup
	for i := 0; i < 50; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if b.mayDial() {
				dials.Add(1)
			}
		}()
	}
	wg.Wait()
	if dials.Load() != 0 {
		t.Fatalf("%d goroutines may dial within the interval", dials.Load())
	}
	b.notBefore.Store(time.Now().Add(-time.Millisecond).UnixNano()) // the interval is over
	for i := 0; i < 50; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if b.mayDial() {
				dials.Add(1)
			}
		}()
	}
	wg.Wait()
	if dials.Load() != 1 {
		t.Fatalf("%d goroutines dial once the interval is over, want 1", dials.Load())
	}
}

// The pool is bounded: a call that finds every connection busy waits for
// one, within the call's deadline, then gets the on-error verdict.
func TestBusyPoolWaitsOnlyUntilTheDeadline(t *testing.T) {
	redis := newFakeRedis(t, 1)
	b, err := newRedisBucket(redis.url(), 10, 1, "reject", "deny", nil)
	if err != nil {
		t.Fatal(err)
	}
	for i := 0; i < redisMaxConns; i++ {
		b.slots <- struct{}{} // every connection taken by calls in flight
	}
	began := time.Now()
	if v := b.take("k"); v != (verdict{admitted: false, storeFailed: true}) {
		t.Fatalf("no connection free: %+v", v)
	}
	if took := time.Since(began); took < redisCallTimeout {
		t.Errorf("gave up after %v, before the %v deadline", took, redisCallTimeout)
	}
	<-b.slots // one comes free
	if v := b.take("k"); !v.admitted || v.storeFailed {
		t.Fatalf("a connection free: %+v", v)
	}
}
