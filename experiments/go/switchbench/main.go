// Goroutine channel ping-pong: nanoseconds per switch, for conclab's switch experiment.
//
// Two goroutines hand a token back and forth over two unbuffered channels; each
// iteration is a round trip (two switches). Rounds are calibrated to about
// -round-s seconds; the median, min and max ns per switch and the process's
// context switches and CPU time over the measured rounds (getrusage) are
// printed as one JSON object, like experiments/switchbench.py does for the
// Python mechanisms.
package main

import (
	"encoding/json"
	"flag"
	"os"
	"runtime"
	"sort"
	"syscall"
	"time"
)

const switchesPerIteration = 2

func pingPong(n int) time.Duration {
	ping, pong := make(chan struct{}), make(chan struct{})
	go func() {
		for i := 0; i < n; i++ {
			<-ping
			pong <- struct{}{}
		}
	}()
	start := time.Now()
	for i := 0; i < n; i++ {
		ping <- struct{}{}
		<-pong
	}
	return time.Since(start)
}

func calibrate(roundS float64) int {
	n := 1000
	for {
		elapsed := pingPong(n).Seconds()
		if elapsed >= roundS*0.2 || n >= 1e9 {
			if elapsed < 1e-9 {
				elapsed = 1e-9
			}
			return int(float64(n)*roundS/elapsed) + 1
		}
		n *= 4
	}
}

// ctxSwitches: voluntary and involuntary context switches and CPU nanoseconds of the process so far.
func ctxSwitches() (int64, int64, int64) {
	var usage syscall.Rusage
	syscall.Getrusage(syscall.RUSAGE_SELF, &usage)
	return int64(usage.Nvcsw), int64(usage.Nivcsw), usage.Utime.Nano() + usage.Stime.Nano()
}

func main() {
	rounds := flag.Int("rounds", 5, "rounds measured; the median is reported")
	roundS := flag.Float64("round-s", 0.2, "target seconds per round")
	flag.Parse()
	if *rounds < 1 {
		*rounds = 1
	}
	n := calibrate(*roundS)
	vol0, invol0, cpu0 := ctxSwitches()
	results := make([]float64, 0, *rounds)
	for i := 0; i < *rounds; i++ {
		results = append(results, float64(pingPong(n).Nanoseconds())/float64(n*switchesPerIteration))
	}
	vol1, invol1, cpu1 := ctxSwitches()
	sorted := append([]float64(nil), results...)
	sort.Float64s(sorted)
	median := sorted[len(sorted)/2]
	if len(sorted)%2 == 0 {
		median = (sorted[len(sorted)/2-1] + sorted[len(sorted)/2]) / 2
	}
	json.NewEncoder(os.Stdout).Encode(map[string]interface{}{
		"bench": "goroutine", "ns_per_switch": median, "ns_min": sorted[0], "ns_max": sorted[len(sorted)-1],
		"iterations": n, "rounds": *rounds, "gomaxprocs": runtime.GOMAXPROCS(0),
		"ctx_voluntary": vol1 - vol0, "ctx_involuntary": invol1 - invol0, "cpu_ns": cpu1 - cpu0,
	})
}
