// The rate limit (--rate-limit, docs/protocol.md 3; docs/ratelimit.md): where
// a connection's token bucket lives, chosen once per connection, so a request
// pays for one function call and whatever its store costs:
//
//   - memory, scope connection: the connection's own bucket, touched only by
//     its goroutine, so it needs no lock;
//   - memory, scope client: one bucket per peer IP address in a map of this
//     process, under a mutex (every connection of a client draws on it); a
//     bucket that is full again is dropped (a new bucket is full, so
//     forgetting it changes nothing), so idle clients cost no memory;
//   - redis: one EVALSHA round trip per request (redis.go); the goroutine
//     blocks on it and the runtime parks it on the netpoller, the model's
//     way to wait. A store that fails or is slow (50 ms) gives the
//     --rate-limit-on-error verdict, counted in rate_store_errors.
//
// STATS is exempt in every store: the lab must always see its counters.
package main

import (
	"math"
	"net"
	"sync"
	"time"
)

// limiter gives one request of its connection a verdict.
type limiter func() verdict

// newStore is the server's Redis client with a redis:// store; nil with the
// memory store, whose buckets newLimiter builds.
func newStore(cfg *config, counts *storeCounters) *redisBucket {
	if cfg.rate == 0 || cfg.redis == nil {
		return nil
	}
	return newRedisBucketAt(*cfg.redis, cfg.rate, cfg.burst, cfg.rateMode, cfg.rateOnError, counts)
}

// newLimiter is one connection's limiter; nil without --rate-limit.
func (s *server) newLimiter(conn net.Conn) limiter {
	cfg := s.cfg
	switch {
	case cfg.rate == 0:
		return nil
	case s.store != nil:
		key := bucketKey(cfg.rateScope, peerIP(conn), newConnectionID())
		return func() verdict { return s.store.take(key) }
	case cfg.rateScope == "client":
		ip := peerIP(conn)
		return func() verdict { return s.clients.take(ip, time.Now()) }
	default:
		bucket := newTokenBucket(cfg.rate, cfg.burst, time.Now())
		reject := cfg.rateMode == "reject"
		return func() verdict { return bucket.verdict(time.Now(), reject) }
	}
}

// peerIP is the client's address without the port: what --rate-limit-scope client keys on.
func peerIP(conn net.Conn) string {
	addr := conn.RemoteAddr().String()
	if host, _, err := net.SplitHostPort(addr); err == nil {
		return host
	}
	return addr // (net.Pipe in tests: "pipe")
}

// tokenBucket allows `rate` requests/s on average, `burst` at once.
type tokenBucket struct {
	rate, burst, tokens float64
	last                time.Time
}

// newTokenBucket is a full bucket.
func newTokenBucket(rate, burst float64, now time.Time) *tokenBucket {
	return &tokenBucket{rate: rate, burst: burst, tokens: burst, last: now}
}

// take spends a token and returns how long until it was there (0: at once).
// With borrow (delay mode) an absent token is taken on credit and the caller
// waits; without (reject mode) nothing is spent when the bucket is empty.
func (b *tokenBucket) take(now time.Time, borrow bool) time.Duration {
	if elapsed := now.Sub(b.last).Seconds(); elapsed > 0 { // (0 * an infinite rate would be NaN)
		b.tokens = math.Min(b.burst, b.tokens+elapsed*b.rate)
	}
	b.last = now
	wait := seconds(math.Max(0, 1-b.tokens) / b.rate)
	if wait == 0 || borrow {
		b.tokens--
	}
	return wait
}

// verdict is take as a verdict: reject mode refuses what delay mode would make wait.
func (b *tokenBucket) verdict(now time.Time, reject bool) verdict {
	wait := b.take(now, !reject)
	if wait > 0 && reject {
		return verdict{}
	}
	return verdict{admitted: true, wait: wait}
}

// fullAt reports whether the bucket has refilled to its size by now: it
// then answers exactly as a new bucket would.
func (b *tokenBucket) fullAt(now time.Time) bool {
	return b.tokens+now.Sub(b.last).Seconds()*b.rate >= b.burst
}

// clientSweepInterval: how often clientBuckets looks for buckets to drop.
const clientSweepInterval = time.Second

// clientBuckets is --rate-limit-scope client with the memory store: one
// bucket per peer IP for this process, under one mutex. Buckets full again
// are dropped at most clientSweepInterval after, by the request that finds
// the sweep due (no goroutine of its own): the map holds the clients active
// in the last burst/rate seconds or so, not every client ever seen.
type clientBuckets struct {
	rate, burst float64
	reject      bool
	mu          sync.Mutex
	buckets     map[string]*tokenBucket
	swept       time.Time
}

func newClientBuckets(cfg *config) *clientBuckets {
	return &clientBuckets{rate: cfg.rate, burst: cfg.burst, reject: cfg.rateMode == "reject",
		buckets: map[string]*tokenBucket{}, swept: time.Now()}
}

// take is one request's verdict from the bucket of client ip.
func (c *clientBuckets) take(ip string, now time.Time) verdict {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.sweep(now)
	bucket := c.buckets[ip]
	if bucket == nil {
		bucket = newTokenBucket(c.rate, c.burst, now)
		c.buckets[ip] = bucket
	}
	return bucket.verdict(now, c.reject)
}

// sweep drops the buckets that are full again, if the last sweep was long enough ago.
func (c *clientBuckets) sweep(now time.Time) {
	if now.Sub(c.swept) < clientSweepInterval {
		return
	}
	c.swept = now
	for ip, bucket := range c.buckets {
		if bucket.fullAt(now) {
			delete(c.buckets, ip)
		}
	}
}

// size is how many client buckets are kept now.
func (c *clientBuckets) size() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return len(c.buckets)
}
