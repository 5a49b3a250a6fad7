"""A real S3-compatible HTTP server on 127.0.0.1 for the object-storage tests: moto's standalone
server (``python -m moto.server``) in its own process, talked to over HTTP by the code under test."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

# dummy credentials: moto accepts any; they only have to exist for the clients to sign requests
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "scd-test-key", "AWS_SECRET_ACCESS_KEY": "scd-test-secret",
               "AWS_DEFAULT_REGION": "us-east-1"}
# variables that would point the clients elsewhere (a developer's own profile or endpoint)
FOREIGN = ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3", "AWS_CONFIG_FILE",
           "AWS_SHARED_CREDENTIALS_FILE", "S3_ENDPOINT_URL")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MotoServer:
    def __init__(self, log: Path, check_credentials: bool = False) -> None:
        """``check_credentials``: enforce IAM authentication, so unknown keys are refused (403)."""
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._log = open(log, "wb")
        env = dict(os.environ)
        if check_credentials:
            env["INITIAL_NO_AUTH_ACTION_COUNT"] = "0"
        self.proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                                     stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"{self.endpoint}/moto-api/", timeout=2).read()
                break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto server did not start: {log.read_text()[-2000:]}") from None
                time.sleep(0.1)

    def env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """An environment whose AWS settings point at this server (and nowhere else)."""
        env = {k: v for k, v in (os.environ if base is None else base).items() if k not in FOREIGN}
        env.update(CREDENTIALS, AWS_ENDPOINT_URL=self.endpoint, AWS_EC2_METADATA_DISABLED="true")
        # a config file that cannot exist, so ~/.aws of whoever runs the tests is never read
        env.update(AWS_CONFIG_FILE=os.devnull, AWS_SHARED_CREDENTIALS_FILE=os.devnull)
        return env

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
                            aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"], region_name="us-east-1")

    def create_bucket(self, name: str) -> str:
        self.client().create_bucket(Bucket=name)
        return name

    def keys(self, bucket: str, prefix: str = "") -> dict[str, int]:
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return {o["Key"]: o["Size"] for page in pages for o in page.get("Contents", [])}

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._log.close()
