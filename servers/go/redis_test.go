package main

import (
	"bufio"
	"bytes"
	"io"
	"reflect"
	"strings"
	"testing"
	"testing/iotest"
	"time"
)

// replies holds one of each RESP2 reply type, nested arrays included, with its encoding.
var replies = []struct {
	wire string
	want interface{}
}{
	{"+OK\r\n", "OK"},
	{"+\r\n", ""},
	{"-NOSCRIPT No matching script.\r\n", respError("NOSCRIPT No matching script.")},
	{":-9223372036854775808\r\n", int64(-9223372036854775808)},
	{"$5\r\na\r\nbc\r\n", []byte("a\r\nbc")},
	{"$0\r\n\r\n", []byte{}},
	{"$-1\r\n", nil},
	{"*-1\r\n", nil},
	{"*0\r\n", []interface{}{}},
	{"*3\r\n:1\r\n*2\r\n$1\r\nx\r\n$-1\r\n-ERR no\r\n", []interface{}{int64(1), []interface{}{[]byte("x"), nil}, respError("ERR no")}},
}

func TestReadRESPDecodesEveryReplyTypeEvenByteByByte(t *testing.T) {
	var stream strings.Builder
	for _, r := range replies {
		stream.WriteString(r.wire)
	}
	for name, source := range map[string]io.Reader{
		"whole":        strings.NewReader(stream.String()),
		"byte by byte": iotest.OneByteReader(strings.NewReader(stream.String())),
		"halves":       iotest.HalfReader(strings.NewReader(stream.String())),
	} {
		r := bufio.NewReaderSize(source, 16) // smaller than some replies: lines and bulks span reads
		for _, want := range replies {
			got, err := readRESP(r)
			if err != nil || !reflect.DeepEqual(got, want.want) {
				t.Fatalf("%s: %q: got %#v, %v; want %#v", name, want.wire, got, err, want.want)
			}
		}
		if _, err := readRESP(r); err != io.EOF {
			t.Fatalf("%s: after the last reply: %v, want io.EOF", name, err)
		}
	}
}

func TestReadRESPRefusesWhatIsNotRESP(t *testing.T) {
	for _, wire := range []string{"?what\r\n", ":12x\r\n", "$3\r\nabcXY", "+OK\n", "*x\r\n"} {
		if _, err := readRESP(bufio.NewReader(strings.NewReader(wire))); err != errRESP {
			t.Errorf("%q: %v, want errRESP", wire, err)
		}
	}
	if _, err := readRESP(bufio.NewReader(strings.NewReader("$10\r\nshort\r\n"))); err != io.ErrUnexpectedEOF {
		t.Errorf("a cut bulk string: %v, want io.ErrUnexpectedEOF", err)
	}
}

func TestRespCommandIsAnArrayOfBulkStrings(t *testing.T) {
	got := respCommand("EVALSHA", "\x00\r\n", "1")
	want := "*3\r\n$7\r\nEVALSHA\r\n$3\r\n\x00\r\n\r\n$1\r\n1\r\n"
	if string(got) != want {
		t.Fatalf("got %q, want %q", got, want)
	}
	back, err := readRESP(bufio.NewReader(bytes.NewReader(got))) // Redis reads what we write
	if err != nil || !reflect.DeepEqual(back, []interface{}{[]byte("EVALSHA"), []byte("\x00\r\n"), []byte("1")}) {
		t.Fatalf("read back: %#v, %v", back, err)
	}
}

func TestParseRedisURL(t *testing.T) {
	good := map[string]redisAddress{
		"redis://127.0.0.1:6379":       {"127.0.0.1", 6379, 0},
		"redis://cache.example:7000/3": {"cache.example", 7000, 3},
		"redis://[::1]:6380/0":         {"::1", 6380, 0},
	}
	for raw, want := range good {
		if got, err := parseRedisURL(raw); err != nil || got != want {
			t.Errorf("%s: got %v, %v; want %v", raw, got, err, want)
		}
	}
	bad := map[string]string{
		"http://127.0.0.1:6379":              "expected redis://HOST:PORT[/DB]",
		"redis://127.0.0.1":                  "a host and a port are needed",
		"redis://127.0.0.1:70000":            "the port is not a number",
		"redis://127.0.0.1:0":                "port 0",
		"redis://127.0.0.1:6379/one":         "the database is a number",
		"redis://user:secret@127.0.0.1:6379": "no user, password",
	}
	for raw, says := range bad {
		_, err := parseRedisURL(raw)
		if err == nil || !strings.Contains(err.Error(), says) || strings.Contains(err.Error(), "\n") {
			t.Errorf("%s: %v, want one line saying %q", raw, err, says)
		}
	}
}

func TestVerdictsAndTheOnErrorRule(t *testing.T) {
	cases := []struct {
		reply int64
		mode  string
		want  verdict
	}{
		{1, "reject", verdict{admitted: true}},
		{0, "reject", verdict{admitted: false}},
		{0, "delay", verdict{admitted: true}},
		{2500, "delay", verdict{admitted: true, wait: 2500 * time.Microsecond}},
	}
	for _, c := range cases {
		if got := verdictOf(c.reply, c.mode); got != c.want {
			t.Errorf("verdictOf(%d, %s) = %+v, want %+v", c.reply, c.mode, got, c.want)
		}
	}
	if got := onErrorVerdict("allow"); got != (verdict{admitted: true, storeFailed: true}) {
		t.Errorf("allow: %+v", got)
	}
	if got := onErrorVerdict("deny"); got != (verdict{admitted: false, storeFailed: true}) {
		t.Errorf("deny: %+v", got)
	}
}

func TestKeysPerConnectionAndPerClient(t *testing.T) {
	first, second := newConnectionID(), newConnectionID()
	if first == second {
		t.Fatalf("two connections share the id %s", first)
	}
	if got := bucketKey("client", "10.0.0.7", first); got != "conclab:bucket:10.0.0.7" {
		t.Errorf("client scope: %s", got)
	}
	if got := bucketKey("connection", "10.0.0.7", first); got != "conclab:bucket:"+first {
		t.Errorf("connection scope: %s", got)
	}
}

func TestNobodyListeningGivesTheOnErrorVerdictOnceConnectingPerInterval(t *testing.T) {
	b, err := newRedisBucket("redis://127.0.0.1:1", 10, 1, "reject", "deny", nil) // port 1: refused on loopback
	if err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 3; i++ {
		if got := b.take("k"); got != (verdict{admitted: false, storeFailed: true}) {
			t.Fatalf("call %d: %+v", i, got)
		}
	}
	if b.counts.errors.Load() != 3 || b.counts.calls.Load() != 0 || b.notBefore.Load() == 0 {
		t.Fatalf("errors %d, calls %d, reconnect gate %d", b.counts.errors.Load(), b.counts.calls.Load(), b.notBefore.Load())
	}
}
