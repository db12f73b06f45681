#!/usr/bin/env python3
"""Spawn one `idle` child through a zygote socket, wait until it is ready, drain it, and print
its exit status. A complete client of docs/PROTOCOL.md in Python 3.9+ with `cbor2`.

Usage: spawn_client.py RUNTIME_DIR   (a directory where a zygote serves zygote.sock)
"""

import os
import socket
import struct
import sys

import cbor2


def send(sock, msg):  # one frame: u32 big-endian length, CBOR map with "v"
    body = cbor2.dumps({"v": 1, **msg})
    sock.sendall(struct.pack(">I", len(body)) + body)


def recv_exact(sock, n):  # never read past the frame: an fd may follow it
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise EOFError("the peer closed the connection")
        buf += chunk
    return buf


def recv(sock):
    (n,) = struct.unpack(">I", recv_exact(sock, 4))
    msg = cbor2.loads(recv_exact(sock, n))
    assert msg.pop("v") == 1, msg
    return msg


def send_fd(sock, fd):  # one SCM_RIGHTS message per fd, 4-byte payload
    socket.send_fds(sock, [b"\0\0\0\0"], [fd])


def recv_fd(sock):  # recvmsg: recv_fds ignores MSG_CMSG_CLOEXEC (3.11)
    _, anc, _, _ = sock.recvmsg(4, socket.CMSG_SPACE(4), socket.MSG_CMSG_CLOEXEC)
    level, kind, data = anc[0]
    assert (level, kind) == (socket.SOL_SOCKET, socket.SCM_RIGHTS), anc
    return int.from_bytes(data[:4], sys.byteorder, signed=True)


def answer(sock, id):  # the answer to `id`; events about others are printed
    while True:
        msg = recv(sock)
        if msg["type"] == "error" and msg["id"] in (id, None):
            sys.exit(f"zygote refused: {msg['code']}: {msg['message']}")
        if msg.get("id") == id and msg["type"] not in ("exited", "child_error"):
            return msg
        print("event:", msg)


zyg = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
zyg.connect(os.path.join(sys.argv[1], "zygote.sock"))
send(zyg, {"type": "hello", "id": 1, "client": "spawn_client.py"})
hello = answer(zyg, 1)
print("hello:", hello["server"], "pid", hello["pid"], "limits", hello["limits"])

mine, theirs = socket.socketpair()  # the control channel: the child gets `theirs`
send(zyg, {"type": "spawn", "id": 2, "entry": "idle", "worker": 0, "listeners": 0})
for fd in (0, 1, 2, theirs.fileno()):  # stdin, stdout, stderr, control, (listeners)
    send_fd(zyg, fd)
theirs.close()
spawned = answer(zyg, 2)
pidfd = recv_fd(zyg)  # the pidfd comes right after `spawned`
print("spawned pid", spawned["pid"], "pidfd", pidfd)
print("control:", recv(mine))  # {'type': 'ready', ...}
send(mine, {"type": "drain", "deadline_ms": 5000})
# (or: signal.pidfd_send_signal(pidfd, signal.SIGTERM); closing `mine` also ends the child)
while (ev := recv(zyg))["type"] != "exited" or ev["id"] != 2:
    print("event:", ev)
print("exited: code", ev["code"], "signal", ev["signal"], "status", ev["status"])
