// Command go_echo is the yardstick for the go backend: a goroutine per
// connection framed ECHO server and nothing else (no deadlines, caps,
// counters, metrics or drain), written the plain way.
//
// A frame is a 4-byte big-endian length, then that many bytes; the reply to a
// frame is the frame itself. Replies are flushed when no further request is
// already buffered, so pipelined requests get one write, as in the Python
// minimal servers.
//
//	go run . -port 0      # or --port 0; prints "listening on HOST:PORT"
package main

import (
	"bufio"
	"encoding/binary"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
)

func main() {
	port := flag.Int("port", 0, "TCP port (0: any free one)")
	flag.Parse()
	ln, err := net.Listen("tcp4", fmt.Sprintf("127.0.0.1:%d", *port))
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	fmt.Println("listening on", ln.Addr())
	for {
		conn, err := ln.Accept()
		if err != nil {
			continue
		}
		go echo(conn)
	}
}

// echo answers whole frames until the client leaves (or sends garbage).
func echo(conn net.Conn) {
	defer conn.Close()
	r, w := bufio.NewReader(conn), bufio.NewWriter(conn)
	head, frame := make([]byte, 4), []byte(nil) // made once: nothing is allocated per request
	for {
		if _, err := io.ReadFull(r, head); err != nil {
			return
		}
		n := int(binary.BigEndian.Uint32(head))
		if cap(frame) < n {
			frame = make([]byte, n)
		}
		frame = frame[:n]
		if _, err := io.ReadFull(r, frame); err != nil {
			return
		}
		w.Write(head)
		w.Write(frame)
		if r.Buffered() == 0 && w.Flush() != nil {
			return
		}
	}
}
