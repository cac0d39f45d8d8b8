"""The suite's own process stays up: hazards of the libraries it drives, reproduced and shown to be defused."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# A tritonclient.http client left in a reference cycle, collected by the GC in a native thread that entered Python
# through a callback (a temporary thread state, as Ray's core worker threads run theirs). Unguarded, closing it
# makes a gevent hub there and the process dies with SIGSEGV when the thread state is cleared.
NATIVE_THREAD_GC = """
import ctypes, gc, http.server, sys, threading
sys.path.insert(0, sys.argv[1])
import tritonclient.http as httpclient
if sys.argv[2] == "guarded":
    from tests.helpers import keep_gevent_clients_on_the_main_thread
    keep_gevent_clients_on_the_main_thread()

class Ok(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        self.send_response(200)
        self.send_header("content-length", "0")
        self.end_headers()
    def log_message(self, *args):
        pass

server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Ok)
threading.Thread(target=server.serve_forever, daemon=True).start()
gc.disable()
client = httpclient.InferenceServerClient(f"127.0.0.1:{server.server_port}")
assert client.is_server_live()
cycle = [client]
cycle.append(cycle)
del client, cycle

callback = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_void_p)(lambda _: gc.collect() and None)
libc = ctypes.CDLL(None)
thread = ctypes.c_ulong()
assert libc.pthread_create(ctypes.byref(thread), None, callback, None) == 0
libc.pthread_join(thread, None)
print("survived")
"""


def test_a_tritonclient_collected_on_a_native_thread_does_not_kill_the_process():
    """With the suite's guard (tests/helpers.keep_gevent_clients_on_the_main_thread) the process lives on; without
    it this same script ends in a segmentation fault (checked by hand: exit -11), as the pytest process did."""
    guarded = subprocess.run(
        [sys.executable, "-c", NATIVE_THREAD_GC, str(ROOT), "guarded"], capture_output=True, text=True, timeout=120
    )
    assert guarded.returncode == 0 and "survived" in guarded.stdout, guarded
