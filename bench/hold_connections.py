#!/usr/bin/env python3
"""Opens N keep-alive connections to host:port, sends one GET on each, reads the answer, and holds
them open until stdin closes. Prints "ready N" once all are established."""
import socket
import sys

host, port, count, path = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
held = []
request = f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()
for _ in range(count):
    s = socket.create_connection((host, port))
    s.sendall(request)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(65536)
        if not chunk:
            raise SystemExit("connection closed early")
        data += chunk
    held.append(s)
print(f"ready {len(held)}", flush=True)
sys.stdin.read()
