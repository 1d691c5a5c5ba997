#!/usr/bin/env bash
# Stops what setup.sh started, each by the process id it recorded (its whole process
# group: setup.sh started each in a session of its own), then PostgreSQL by pg_ctl.
# The state stays under $FRESHPOOL_OPENSTACK_REAL_DIR (/tmp/openstack-real): setup.sh
# starts the same cloud again in seconds; `rm -rf` that directory to start afresh.
set -uo pipefail

BASE=${FRESHPOOL_OPENSTACK_REAL_DIR:-/tmp/openstack-real}
RUN=$BASE/run

# The API services first, the message bus and its epmd last.
ORDER=(nova-compute nova-scheduler nova-conductor nova-api neutron placement glance keystone
       rabbitmq epmd)

stop_one() {
    local name=$1 file=$RUN/$1.pid pid i
    [ -f "$file" ] || return 0
    pid=$(cat "$file")
    if kill -0 "$pid" 2>/dev/null; then
        kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null
        for ((i = 0; i < 80; i++)); do
            kill -0 -- "-$pid" 2>/dev/null || break
            sleep 0.25
        done
        if kill -0 -- "-$pid" 2>/dev/null; then
            kill -KILL -- "-$pid" 2>/dev/null
            echo "$name: killed (pid $pid)"
        else
            echo "$name: stopped (pid $pid)"
        fi
    fi
    rm -f "$file"
}

for name in "${ORDER[@]}"; do
    stop_one "$name"
done

data=$BASE/pg/data
if [ -f "$data/postmaster.pid" ]; then
    bin=$(ls -d /usr/lib/postgresql/*/bin | tail -1)
    runuser -u postgres -- "$bin/pg_ctl" -D "$data" -m fast -w stop >/dev/null && echo "postgres: stopped"
fi
