#!/usr/bin/env python3
"""A stand-in for Jenkins' agent.jar, for freshpool's tests, run by a `java` shim as
`java -jar agent.jar -url URL -name NAME -secret @FILE -webSocket -workDir DIR`.

What it keeps of agent.jar: that command line (the secret read from a file when given
as @FILE), that it connects to the controller at -url naming itself by -name with its
secret (the Node-Name and Secret-Key headers of the WebSocket transport), that it
stays connected taking the builds the controller gives it, one at a time, running each
in DIR/workspace/JOB, and that it ends when the controller deletes its agent. What it
replaces: the remoting protocol over WebSocket, which is not a public API, by
long-polled HTTP to the fake Jenkins' /_fake/remoting/ routes; a build is a shell
script, not a Jenkins job's steps.
"""

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request


def options(argv):
    wanted = {"-url": None, "-name": None, "-secret": None, "-workDir": None}
    args = list(argv)
    while args:
        arg = args.pop(0)
        if arg in wanted and args:
            wanted[arg] = args.pop(0)
        elif arg != "-webSocket":
            raise SystemExit(f"agent.jar: unknown option {arg}")
    if None in wanted.values():
        raise SystemExit("agent.jar: -url, -name, -secret and -workDir are required here")
    secret = wanted["-secret"]
    if secret.startswith("@"):
        with open(secret[1:]) as handle:
            secret = handle.read().strip()
    base = wanted["-url"].rstrip("/") + "/_fake/remoting"
    return base, wanted["-name"], secret, wanted["-workDir"]


class Channel:
    def __init__(self, base, name, secret):
        self.base, self.name, self.secret = base, name, secret

    def call(self, method, path, body=None, timeout=30):
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.base + path, data=data, method=method)
        request.add_header("Node-Name", self.name)
        request.add_header("Secret-Key", self.secret)
        request.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                text = response.read()
                return response.status, json.loads(text) if text else None
        except urllib.error.HTTPError as exc:
            return exc.code, None


def run_build(channel, work, workdir):
    workspace = os.path.join(workdir, "workspace", work["job"])
    os.makedirs(workspace, exist_ok=True)
    env = {
        **os.environ,
        "BUILD_URL": work["url"],
        "NODE_NAME": channel.name,
        "WORKSPACE": workspace,
    }
    print(f"INFO: running {work['url']}", flush=True)
    process = subprocess.Popen(
        ["bash", "-c", work["script"]],
        cwd=workspace,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    aborted = False
    while process.poll() is None:
        time.sleep(0.5)
        status, answer = channel.call("POST", f"/heartbeat?build={work['build']}")
        if status == 404 or (answer or {}).get("abort"):
            aborted = True
            os.killpg(process.pid, 9)
            process.wait()
            if status == 404:
                return False
    output = process.stdout.read().decode(errors="replace")
    result = "ABORTED" if aborted else ("SUCCESS" if process.returncode == 0 else "FAILURE")
    status, _ = channel.call(
        "POST", "/done", {"build": work["build"], "result": result, "output": output}
    )
    print(f"INFO: {work['url']} finished: {result}", flush=True)
    return status != 404


def main(argv):
    base, name, secret, workdir = options(argv)
    channel = Channel(base, name, secret)
    status, _ = channel.call("POST", "/connect")
    if status != 200:
        print(f"SEVERE: the server rejected the connection: HTTP {status}", file=sys.stderr)
        return 1
    print("INFO: Connected", flush=True)
    failures = 0
    while True:
        try:
            status, work = channel.call("GET", "/work")
        except OSError as exc:
            failures += 1
            if failures > 20:
                print(f"SEVERE: lost the controller: {exc}", file=sys.stderr)
                return 1
            time.sleep(1)
            continue
        failures = 0
        if status in (403, 404):
            print("INFO: Terminated: the agent was deleted", flush=True)
            return 0
        if status == 200 and work and not run_build(channel, work, workdir):
            print("INFO: Terminated during a build", flush=True)
            return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
