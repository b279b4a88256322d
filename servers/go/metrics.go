package main

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"os"
	"strings"
	"sync/atomic"
	"time"
)

// The metrics endpoint is an HTTP server on its own port, so it gets what
// any Go HTTP server facing clients needs: timeouts. http.Serve(ln, mux)
// has none, and a client that sends half a request line and then nothing
// (slowloris) holds a goroutine and a descriptor for ever. These limits are
// generous for a Prometheus scrape (a small GET, a few KiB back).
const (
	metricsReadHeaderTimeout = 2 * time.Second  // request line and headers
	metricsReadTimeout       = 5 * time.Second  // the whole request
	metricsWriteTimeout      = 5 * time.Second  // from the end of the headers to the end of the response
	metricsIdleTimeout       = 30 * time.Second // a kept-alive connection between scrapes
	metricsMaxHeaderBytes    = 16 << 10
	metricsShutdownTimeout   = time.Second // at exit: finish the scrape in progress, at most this long
)

// metricsServer is the /metrics endpoint as an http.Server with its timeouts.
func (s *server) metricsServer() *http.Server {
	mux := http.NewServeMux()
	mux.HandleFunc("/metrics", s.metrics)
	return &http.Server{
		Handler:           mux,
		ReadHeaderTimeout: metricsReadHeaderTimeout,
		ReadTimeout:       metricsReadTimeout,
		WriteTimeout:      metricsWriteTimeout,
		IdleTimeout:       metricsIdleTimeout,
		MaxHeaderBytes:    metricsMaxHeaderBytes,
	}
}

// startMetrics serves /metrics on host:port in its own goroutines and says
// where on log, as one line `metrics on HOST:PORT` (with --metrics-port 0 the
// kernel chose the port). The Python backends print nothing for it; stdout is
// kept for `listening on` and the final JSON line, so this goes to stderr.
func (s *server) startMetrics(host string, port int, log io.Writer) (*http.Server, error) {
	ln, err := listen(host, port)
	if err != nil {
		return nil, fmt.Errorf("cannot serve metrics on %s:%d: %v", host, port, errReason(err))
	}
	srv := s.metricsServer()
	go srv.Serve(ln) // returns http.ErrServerClosed at stopMetrics
	fmt.Fprintln(log, "metrics on", ln.Addr())
	return srv, nil
}

// stopMetrics ends the endpoint at exit, as the Python backends do after
// their drain: no new scrapes, the one in progress gets a moment to finish.
func stopMetrics(srv *http.Server) {
	ctx, cancel := context.WithTimeout(context.Background(), metricsShutdownTimeout)
	defer cancel()
	if srv.Shutdown(ctx) != nil {
		srv.Close()
	}
}

// metrics is the Prometheus text exposition (format 0.0.4), written by hand.
func (s *server) metrics(w http.ResponseWriter, _ *http.Request) {
	w.Header().Set("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
	s.stats.each(func(name, help string, v *atomic.Int64) {
		if name == "connections_active" || name == "buffered_bytes" {
			metric(w, "conclab_"+name, "gauge", help, v.Load())
		} else {
			metric(w, "conclab_"+strings.TrimSuffix(name, "_total")+"_total", "counter", help, v.Load())
		}
	})
	fds, _ := os.ReadDir("/proc/self/fd")
	metric(w, "conclab_open_fds", "gauge", "File descriptors open in this process.", int64(len(fds)-1)) // -1: ReadDir's own
	metric(w, "conclab_close_wait_connections", "gauge",
		"Sockets on the server port in CLOSE_WAIT: the peer closed, we did not.", s.closeWait())
	// Go only (not in STATS, whose keys every backend shares): connection
	// handlers that panicked, were recovered and had their connection closed.
	metric(w, "conclab_handler_panics_total", "counter", "Connection handlers that panicked (recovered).", s.panics.Load())
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
