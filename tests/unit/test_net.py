"""rlhf_ops.utils.net.wait_for_http: up, never up, and a process that died."""
import http.server
import threading
import time

from rlhf_ops.distributed.engine import free_port
from rlhf_ops.utils.net import wait_for_http


class _Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802
        ok = self.path == "/api/health" and self.headers.get("Authorization") in (None, "Bearer t")
        self.send_response(200 if ok else 401)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_up_down_and_dead():
    server = http.server.HTTPServer(("127.0.0.1", 0), _Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_port}"
    try:
        assert wait_for_http(f"{base}/api/health", 5)
        assert wait_for_http(f"{base}/api/health", 5, headers={"Authorization": "Bearer t"})
        assert not wait_for_http(f"{base}/api/health", 0.5, headers={"Authorization": "Bearer x"}, interval_s=0.1)
    finally:
        server.shutdown()
    assert not wait_for_http(f"http://127.0.0.1:{free_port()}/", 0.5, interval_s=0.1)  # nothing listens
    t = time.monotonic()
    assert not wait_for_http(f"http://127.0.0.1:{free_port()}/", 60, alive=lambda: False)  # its process exited
    assert time.monotonic() - t < 5
