# The same hand-over with the listening socket itself passed to the new process
# (SCM_RIGHTS), as ztunnel does (ARCHITECTURE.md, "Upgrade"):
#   sudo unshare -n python3 docs/upgrade/scm_rights.py
import socket, subprocess, os, time
subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
old = socket.socket(); old.bind(("127.0.0.1", 15006)); old.listen(1024)
a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
socket.send_fds(a, [b"take"], [old.fileno()])
_, fds, _, _ = socket.recv_fds(b, 16, 1)
new = socket.socket(fileno=fds[0])
N = 400
clients = [socket.create_connection(("127.0.0.1", 15006)) for _ in range(N)]
time.sleep(0.2)
old.close()
new.setblocking(False)
accepted = 0
while True:
    try:
        conn, _ = new.accept(); conn.close(); accepted += 1
    except BlockingIOError:
        break
print(f"SCM_RIGHTS: {N} connections queued; old descriptor closed: {accepted} taken by the new process, {N - accepted} lost")
