#!/usr/bin/env python3
"""A stand-in for actions/runner's `run.sh --jitconfig CONFIG`, for freshpool's tests.

What it keeps of the real runner: the command line, the JIT config's format (base64
JSON of the `.runner`, `.credentials` and `.credentials_rsaparams` files), that the
config works once, that the runner connects to the server named in `.runner`, takes
exactly one job, runs it, reports its result and exits; that it exits when its
registration is deleted; and that it refuses to run as root without
RUNNER_ALLOW_RUNASROOT. What it replaces: the Actions service's own protocol (a
session, long-polled messages, job results), which is not public, by three plain HTTP
calls to the fake GitHub's /_fake/broker/ routes; a job is a shell script, not a
workflow's steps.
"""

import base64
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request


def decode(value):
    return json.loads(base64.b64decode(value))


def call(method, url, token, body=None, timeout=30):
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method)
    request.add_header("Authorization", f"Bearer {token}")
    request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            text = response.read()
            return response.status, json.loads(text) if text else None
    except urllib.error.HTTPError as exc:
        return exc.code, None


def main(argv):
    if len(argv) != 2 or argv[0] != "--jitconfig":
        print("usage: run.sh --jitconfig CONFIG", file=sys.stderr)
        return 2
    if os.geteuid() == 0 and os.environ.get("RUNNER_ALLOW_RUNASROOT") != "1":
        print("Must not run with sudo", file=sys.stderr)
        return 1
    files = decode(argv[1])
    runner = decode(files[".runner"])
    token = decode(files[".credentials"])["data"]["token"]
    broker = runner["serverUrl"].rstrip("/") + "/_fake/broker"
    status, session = call("POST", f"{broker}/sessions", token, {"agentId": runner["agentId"]})
    if status != 201:
        print(f"Failed to create a session: HTTP {status}", file=sys.stderr)
        return 1
    print(f"Connected to GitHub as {runner['agentName']}", flush=True)
    print("Listening for Jobs", flush=True)
    while True:
        status, message = call("GET", f"{broker}/message?agentId={runner['agentId']}", token)
        if status == 204:
            continue
        if status in (401, 404):
            print("Runner registration has been deleted from the server", flush=True)
            return 0
        if status != 200:
            time.sleep(1)
            continue
        job = message["job"]
        print(f"Running job: {job['name']}", flush=True)
        work = os.path.join(os.path.dirname(os.path.abspath(__file__)), runner["workFolder"])
        os.makedirs(work, exist_ok=True)
        done = subprocess.run(["sh", "-c", job["script"]], cwd=work, capture_output=True,
                              text=True, env={**os.environ, "GITHUB_JOB_ID": str(job["id"])})
        conclusion = "success" if done.returncode == 0 else "failure"
        call("POST", f"{broker}/jobs/{job['id']}/finish", token,
             {"conclusion": conclusion, "output": done.stdout + done.stderr})
        print(f"Job {job['name']} completed with result: {conclusion}", flush=True)
        return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
