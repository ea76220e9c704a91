"""A TCP relay to a server on 127.0.0.1 that a test can cut: what a network outage looks like to a client.

`down()` closes the listener and every open connection (connections are refused until `up()`);
`arm(budget_bytes)` cuts for good once clients have sent that many bytes: a network dying mid-upload.
"""

import socket
import threading


class TcpRelay:
    def __init__(self, target_port: int):
        self.target = target_port
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.budget = float("inf")
        self.cut = threading.Event()  # set when an armed budget ran out
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self.listener = None
        self.up()

    def up(self) -> None:
        if self.listener is not None or self.cut.is_set():
            return
        self.listener = socket.create_server(("127.0.0.1", self.port))
        threading.Thread(target=self._accept, args=(self.listener,), daemon=True).start()

    def down(self) -> None:
        with self._lock:
            if self.listener is None:
                return
            for s in [self.listener, *self._sockets]:
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()
            self._sockets = []
            self.listener = None

    def arm(self, budget_bytes: int) -> None:
        self.budget = budget_bytes

    def _accept(self, listener) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target))
            with self._lock:
                self._sockets += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, counted: bool) -> None:
        try:
            while data := source.recv(65536):
                if counted:
                    with self._lock:
                        self.budget -= len(data)
                        exhausted = self.budget < 0
                    if exhausted:
                        self.cut.set()
                        self.down()
                        return
                sink.sendall(data)
        except OSError:
            pass
        for s in (source, sink):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
