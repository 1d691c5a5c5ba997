"""A throwaway ZooKeeper server (Debian's package) on a free loopback port, TLS only,
with its own data dir and CA; client certificates required, as Zuul deployments do."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

JAR = Path("/usr/share/java/zookeeper.jar")
# Debian's jar lists its dependencies in its manifest, except netty's codec, which
# the TLS (Netty) connection factory needs.
CLASSPATH = f"{JAR}:/usr/share/java/netty-codec.jar:/etc/zookeeper/conf"
MAIN = "org.apache.zookeeper.server.ZooKeeperServerMain"


def available() -> str:
    """Why the server cannot run here, or "" if it can."""
    if not JAR.exists():
        return f"{JAR} is missing: apt-get install zookeeper"
    if shutil.which("java") is None or shutil.which("openssl") is None:
        return "java and openssl are needed to run ZooKeeper with TLS"
    return ""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Tls:
    ca: Path
    cert: Path
    key: Path


def make_tls(root: Path) -> tuple[Tls, Path]:
    """A CA, a client certificate and a server PEM (key and certificate in one file)."""
    root.mkdir(parents=True, exist_ok=True)

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=root, check=True, capture_output=True)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=test-ca",
        "-keyout", "ca.key", "-out", "ca.pem")  # fmt: skip
    for name in ("server", "client"):
        run("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}",
            "-keyout", f"{name}.key", "-out", f"{name}.csr")  # fmt: skip
        (root / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
        sign = ["-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial", "-days", "2"]
        run("x509", "-req", "-in", f"{name}.csr", *sign, "-extfile", "san.ext",
            "-out", f"{name}.pem")  # fmt: skip
    server = root / "server-bundle.pem"
    server.write_text((root / "server.key").read_text() + (root / "server.pem").read_text())
    return Tls(root / "ca.pem", root / "client.pem", root / "client.key"), server


class ZooKeeper:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.tls, self._server_pem = make_tls(root / "tls")
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def hosts(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 60.0) -> None:
        data = self.root / "data"
        data.mkdir(exist_ok=True)
        config = self.root / "zoo.cfg"
        config.write_text(
            f"tickTime=500\ndataDir={data}\nsecureClientPort={self.port}\n"
            "secureClientPortAddress=127.0.0.1\n"
            "serverCnxnFactory=org.apache.zookeeper.server.NettyServerCnxnFactory\n"
            f"ssl.keyStore.location={self._server_pem}\nssl.keyStore.type=PEM\n"
            f"ssl.trustStore.location={self.tls.ca}\nssl.trustStore.type=PEM\n"
            "ssl.clientAuth=need\nadmin.enableServer=false\nmaxSessionTimeout=60000\n"
        )
        log = (self.root / "zookeeper.log").open("ab")
        self.process = subprocess.Popen(
            ["java", "-Xmx256m", "-Dzookeeper.log.dir=" + str(self.root), "-cp",
             CLASSPATH, MAIN, str(config)],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"ZooKeeper exited: see {self.root / 'zookeeper.log'}")
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.1)
        raise RuntimeError("ZooKeeper did not listen in time")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self.process = None

    def restart(self) -> None:
        self.stop()
        self.start()
