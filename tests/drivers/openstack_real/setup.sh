#!/usr/bin/env bash
# A real single-host OpenStack (Zed, from Debian 12's own packages) for the opt-in
# test test_real_nova.py: Keystone, Glance, Placement, Nova (api, conductor,
# scheduler, compute with the fake virt driver) and Neutron (ML2/openvswitch, no
# agents: one agent row is written so ports bind), on PostgreSQL and RabbitMQ.
# Everything listens on 127.0.0.1 only, runs as processes started here (no systemd),
# and keeps its state under $FRESHPOOL_OPENSTACK_REAL_DIR (/tmp/openstack-real).
#
# Idempotent: run it again and it installs, initialises and starts only what is
# missing. Stop it all with stop.sh beside this file; `rm -rf` the state directory
# to start from scratch. Last lines printed: the clouds.yaml and the exports.
#
#   bash tests/drivers/openstack_real/setup.sh
#   export FRESHPOOL_OPENSTACK_REAL_CLOUDS=/tmp/openstack-real/clouds.yaml
#   python3 -m pytest -m openstack_real tests/drivers/openstack_real
set -euo pipefail

BASE=${FRESHPOOL_OPENSTACK_REAL_DIR:-/tmp/openstack-real}
ETC=$BASE/etc
LOGS=$BASE/logs
RUN=$BASE/run
PY=/usr/bin/python3  # Debian's: the services' own libraries

# Loopback ports, away from the usual ones so a real service on them is no clash.
PG_PORT=5439
EPMD_PORT=4370
RABBIT_PORT=5679
RABBIT_DIST_PORT=25679
KEYSTONE_PORT=25000
GLANCE_PORT=29292
PLACEMENT_PORT=28778
NOVA_PORT=28774
NEUTRON_PORT=29696

# Loopback-only throwaway cloud: fixed passwords.
DB_PW=openstack-db
ADMIN_PW=freshpool-admin
SERVICE_PW=freshpool-service
USER_PW=freshpool-user
COMPUTE_HOST=fp-compute-1
KS=http://127.0.0.1:$KEYSTONE_PORT
DB="postgresql+psycopg2://openstack:$DB_PW@127.0.0.1:$PG_PORT"
RABBIT="rabbit://guest:guest@127.0.0.1:$RABBIT_PORT/"

PACKAGES=(keystone glance placement-api nova-api nova-conductor nova-scheduler python3-nova
          neutron-server rabbitmq-server postgresql python3-openstackclient python3-psycopg2
          uwsgi-plugin-python3 curl)

T0=$(date +%s)
step() { echo "[setup $(( $(date +%s) - T0 ))s] $*"; }

mkdir -p "$BASE" "$ETC" "$LOGS" "$RUN"
chmod 755 "$BASE"

# ------------------------------------------------------------------ packages
install_packages() {
    local missing=()
    for p in "${PACKAGES[@]}"; do
        [ "$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null)" = "install ok installed" ] \
            || missing+=("$p")
    done
    if [ ${#missing[@]} -eq 0 ]; then step "packages: installed"; return; fi
    step "packages: installing ${missing[*]}"
    # No database/endpoint questions: everything is configured below, by hand.
    local q
    for q in keystone/configure_db keystone/create-admin-tenant keystone/register-endpoint \
             glance/configure_db glance/register-endpoint nova/configure_db nova/register-endpoint \
             placement/configure_db placement/register-endpoint neutron/configure_db \
             neutron/register-endpoint; do
        echo "${q%%/*}-common $q boolean false"
        echo "${q%%/*} $q boolean false"
    done | debconf-set-selections
    # No service starts on install (there may be no init system at all).
    local made_policy=
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d && chmod 755 /usr/sbin/policy-rc.d
        made_policy=1
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" \
        >"$LOGS/apt-install.log" 2>&1 || {
        apt-get update -q >>"$LOGS/apt-install.log" 2>&1
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" \
            >>"$LOGS/apt-install.log" 2>&1
    }
    [ -z "$made_policy" ] || rm -f /usr/sbin/policy-rc.d
}

# ------------------------------------------------------------------ processes
alive() { [ -f "$RUN/$1.pid" ] && kill -0 "$(cat "$RUN/$1.pid")" 2>/dev/null; }

# start NAME CMD...: in its own session (stop.sh ends its process group by id).
start() {
    local name=$1; shift
    if alive "$name"; then step "$name: running (pid $(cat "$RUN/$name.pid"))"; return; fi
    setsid "$@" >>"$LOGS/$name.out" 2>&1 </dev/null &
    echo $! >"$RUN/$name.pid"
    step "$name: started (pid $!)"
}

wait_port() {  # wait_port NAME PORT [SECONDS]
    local i
    for ((i = 0; i < ${3:-120} * 4; i++)); do
        (exec 3<>"/dev/tcp/127.0.0.1/$2") 2>/dev/null && return 0
        alive "$1" || { echo "$1 died; see $LOGS/$1.*" >&2; tail -20 "$LOGS/$1.out" >&2; exit 1; }
        sleep 0.25
    done
    echo "$1: port $2 not open after ${3:-120}s" >&2; exit 1
}

wait_http() {  # wait_http NAME URL: any HTTP answer
    local i
    for ((i = 0; i < 480; i++)); do
        curl -s -o /dev/null -m 5 "$2" && return 0
        alive "$1" || { echo "$1 died; see $LOGS/$1.*" >&2; tail -20 "$LOGS/$1.out" >&2; exit 1; }
        sleep 0.25
    done
    echo "$1: no answer from $2" >&2; exit 1
}

# uwsgi_app NAME PORT WSGI-FILE [ENV=VALUE...]: a WSGI service on 127.0.0.1:PORT.
uwsgi_app() {
    local name=$1 port=$2 file=$3; shift 3
    local envs=() e
    for e in "$@"; do envs+=(--env "$e"); done
    start "$name" uwsgi --plugin python3 --http-socket "127.0.0.1:$port" --wsgi-file "$file" \
        --master --processes 2 --threads 4 --enable-threads --lazy-apps --die-on-term \
        --no-orphans --buffer-size 65535 \
        --add-header "Connection: close" \
        --need-app --logto "$LOGS/$name.log" "${envs[@]}"
    wait_http "$name" "http://127.0.0.1:$port/"
}

# ------------------------------------------------------------------ PostgreSQL
postgres() {
    local bin=/usr/lib/postgresql/15/bin data=$BASE/pg/data
    [ -x $bin/initdb ] || bin=$(ls -d /usr/lib/postgresql/*/bin | tail -1)
    mkdir -p "$BASE/pg/run"
    chown postgres: "$BASE/pg" "$BASE/pg/run"
    if [ ! -f "$data/PG_VERSION" ]; then
        step "postgres: initdb"
        runuser -u postgres -- "$bin/initdb" -D "$data" -A trust -U postgres >"$LOGS/initdb.log"
    fi
    if runuser -u postgres -- "$bin/pg_ctl" -D "$data" status >/dev/null 2>&1; then
        step "postgres: running"
    else
        runuser -u postgres -- "$bin/pg_ctl" -D "$data" -l "$BASE/pg/postgres.log" -w -o \
            "-p $PG_PORT -k $BASE/pg/run -c listen_addresses=127.0.0.1 -c max_connections=300 -c fsync=off" \
            start >/dev/null
        step "postgres: started on 127.0.0.1:$PG_PORT"
    fi
    local psql=(runuser -u postgres -- psql -h "$BASE/pg/run" -p $PG_PORT -U postgres -qtA)
    [ "$("${psql[@]}" -c "SELECT 1 FROM pg_roles WHERE rolname='openstack'")" = 1 ] \
        || "${psql[@]}" -c "CREATE ROLE openstack LOGIN PASSWORD '$DB_PW'"
    local d
    for d in keystone glance placement nova_api nova nova_cell0 neutron; do
        [ "$("${psql[@]}" -c "SELECT 1 FROM pg_database WHERE datname='$d'")" = 1 ] \
            || "${psql[@]}" -c "CREATE DATABASE $d OWNER openstack"
    done
}

# ------------------------------------------------------------------ RabbitMQ
rabbit_env() {
    export HOME=$BASE/rabbitmq RABBITMQ_NODENAME=freshpool@localhost
    export RABBITMQ_NODE_IP_ADDRESS=127.0.0.1 RABBITMQ_NODE_PORT=$RABBIT_PORT
    export RABBITMQ_DIST_PORT=$RABBIT_DIST_PORT ERL_EPMD_ADDRESS=127.0.0.1 ERL_EPMD_PORT=$EPMD_PORT
    export RABBITMQ_MNESIA_BASE=$BASE/rabbitmq/mnesia RABBITMQ_LOG_BASE=$LOGS
    export RABBITMQ_ENABLED_PLUGINS_FILE=$BASE/rabbitmq/enabled_plugins
    export RABBITMQ_CONFIG_FILE=$BASE/rabbitmq/rabbitmq
    export RABBITMQ_ADVANCED_CONFIG_FILE=$BASE/rabbitmq/advanced.config
    export RABBITMQ_PID_FILE=$BASE/rabbitmq/beam.pid
}

rabbitmq() {
    mkdir -p "$BASE/rabbitmq/mnesia"
    [ -f "$BASE/rabbitmq/.erlang.cookie" ] || {
        head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$BASE/rabbitmq/.erlang.cookie"
        chmod 400 "$BASE/rabbitmq/.erlang.cookie"
    }
    echo "[]." >"$BASE/rabbitmq/enabled_plugins"
    printf 'listeners.tcp.default = 127.0.0.1:%s\nloopback_users.guest = true\n' $RABBIT_PORT \
        >"$BASE/rabbitmq/rabbitmq.conf"
    echo "[]." >"$BASE/rabbitmq/advanced.config"
    (
        rabbit_env
        # epmd in the foreground, started here, so stop.sh ends it by its pid.
        start epmd epmd -address 127.0.0.1 -port $EPMD_PORT
        wait_port epmd $EPMD_PORT 30
        start rabbitmq /usr/lib/rabbitmq/bin/rabbitmq-server
        wait_port rabbitmq $RABBIT_PORT 120
    )
}

# ------------------------------------------------------------------ config files
authtoken() {  # authtoken USER: keystonemiddleware's section, and the service user's
    cat <<EOF
[keystone_authtoken]
www_authenticate_uri = $KS/v3
auth_url = $KS/v3
auth_type = password
project_domain_name = Default
user_domain_name = Default
project_name = service
username = $1
password = $SERVICE_PW
service_token_roles_required = true
EOF
}

service_auth() {  # service_auth SECTION USER
    cat <<EOF
[$1]
auth_url = $KS/v3
auth_type = password
project_domain_name = Default
user_domain_name = Default
project_name = service
username = $2
password = $SERVICE_PW
region_name = RegionOne
EOF
}

write_configs() {
    mkdir -p "$ETC"/{keystone,glance,placement,nova,neutron} "$BASE"/keystone/{fernet-keys,credential-keys} \
        "$BASE"/glance/{images,staging,tasks} "$BASE"/nova/{state,instances,lock} \
        "$BASE"/neutron/{state,lock} "$BASE/placement"

    cat >"$ETC/keystone/keystone.conf" <<EOF
[DEFAULT]
log_file = $LOGS/keystone-app.log
[database]
connection = $DB/keystone
[token]
provider = fernet
[fernet_tokens]
key_repository = $BASE/keystone/fernet-keys
[fernet_receipts]
key_repository = $BASE/keystone/fernet-keys
[credential]
key_repository = $BASE/keystone/credential-keys
EOF

    { cat <<EOF
[DEFAULT]
bind_host = 127.0.0.1
bind_port = $GLANCE_PORT
workers = 1
log_file = $LOGS/glance-api.log
enabled_backends = fs:file
[database]
connection = $DB/glance
[paste_deploy]
flavor = keystone
config_file = /etc/glance/glance-api-paste.ini
[glance_store]
default_backend = fs
[fs]
filesystem_store_datadir = $BASE/glance/images
[os_glance_staging_store]
filesystem_store_datadir = $BASE/glance/staging
[os_glance_tasks_store]
filesystem_store_datadir = $BASE/glance/tasks
[oslo_concurrency]
lock_path = $BASE/glance
EOF
      authtoken glance; } >"$ETC/glance/glance-api.conf"

    { cat <<EOF
[DEFAULT]
log_file = $LOGS/placement-app.log
[placement_database]
connection = $DB/placement
[api]
auth_strategy = keystone
EOF
      authtoken placement; } >"$ETC/placement/placement.conf"

    cp /etc/nova/api-paste.ini "$ETC/nova/api-paste.ini"
    { cat <<EOF
[DEFAULT]
host = $COMPUTE_HOST
compute_driver = fake.FakeDriver
transport_url = $RABBIT
my_ip = 127.0.0.1
state_path = $BASE/nova/state
instances_path = $BASE/nova/instances
enabled_apis = osapi_compute
use_rootwrap_daemon = false
[api]
auth_strategy = keystone
[api_database]
connection = $DB/nova_api
[database]
connection = $DB/nova
[wsgi]
api_paste_config = $ETC/nova/api-paste.ini
[oslo_concurrency]
lock_path = $BASE/nova/lock
[oslo_messaging_notifications]
driver = noop
[vnc]
enabled = false
[spice]
enabled = false
[conductor]
workers = 1
[scheduler]
workers = 1
discover_hosts_in_cells_interval = -1
[glance]
region_name = RegionOne
[cinder]
os_region_name = RegionOne
EOF
      authtoken nova
      service_auth service_user nova; echo "send_service_user_token = true"
      service_auth placement placement
      service_auth neutron neutron; } >"$ETC/nova/nova.conf"
    # nova-compute reaches the databases only through the conductor: no connections.
    awk '/^\[/ { skip = ($0 == "[api_database]" || $0 == "[database]") } !skip' \
        "$ETC/nova/nova.conf" >"$ETC/nova/nova-compute.conf"

    { cat <<EOF
[DEFAULT]
bind_host = 127.0.0.1
bind_port = $NEUTRON_PORT
core_plugin = ml2
service_plugins =
auth_strategy = keystone
transport_url = $RABBIT
state_path = $BASE/neutron/state
api_paste_config = /etc/neutron/api-paste.ini
api_workers = 1
rpc_workers = 1
rpc_state_report_workers = 0
notify_nova_on_port_status_changes = false
notify_nova_on_port_data_changes = false
log_file = $LOGS/neutron-server.log
[database]
connection = $DB/neutron
[oslo_concurrency]
lock_path = $BASE/neutron/lock
[ml2]
type_drivers = flat,vxlan
tenant_network_types = vxlan
mechanism_drivers = openvswitch
extension_drivers = port_security
[ml2_type_vxlan]
vni_ranges = 1:1000
[ml2_type_flat]
flat_networks = *
[securitygroup]
enable_security_group = true
[agent]
root_helper =
EOF
      authtoken neutron
      service_auth nova nova; } >"$ETC/neutron/neutron.conf"
}

# ------------------------------------------------------------------ the services
keystone() {
    local conf=$ETC/keystone/keystone.conf
    if [ ! -f "$BASE/keystone/.done" ]; then
        step "keystone: db_sync, fernet keys, bootstrap"
        keystone-manage --config-file "$conf" db_sync
        keystone-manage --config-file "$conf" fernet_setup --keystone-user root --keystone-group root
        keystone-manage --config-file "$conf" credential_setup --keystone-user root --keystone-group root
        keystone-manage --config-file "$conf" bootstrap --bootstrap-password "$ADMIN_PW" \
            --bootstrap-admin-url "$KS/v3/" --bootstrap-internal-url "$KS/v3/" \
            --bootstrap-public-url "$KS/v3/" --bootstrap-region-id RegionOne
        touch "$BASE/keystone/.done"
    fi
    uwsgi_app keystone $KEYSTONE_PORT /usr/bin/keystone-wsgi-public \
        "OS_KEYSTONE_CONFIG_FILES=$conf"
}

register() {  # users, projects, services and endpoints, flavors later (nova needed)
    step "keystone: service users, endpoints, the freshpool project"
    OS_AUTH_URL=$KS/v3 ADMIN_PW=$ADMIN_PW SERVICE_PW=$SERVICE_PW USER_PW=$USER_PW \
    GLANCE_PORT=$GLANCE_PORT PLACEMENT_PORT=$PLACEMENT_PORT NOVA_PORT=$NOVA_PORT \
    NEUTRON_PORT=$NEUTRON_PORT $PY - <<'EOF'
import os
from keystoneauth1 import session
from keystoneauth1.identity import v3
from keystoneclient.v3 import client

e = os.environ
auth = v3.Password(auth_url=e["OS_AUTH_URL"], username="admin", password=e["ADMIN_PW"],
                   project_name="admin", user_domain_id="default", project_domain_id="default")
ks = client.Client(session=session.Session(auth=auth))

def one(manager, name, **kw):
    found = manager.list(name=name)
    return found[0] if found else manager.create(name=name, **kw)

def project(name):
    return one(ks.projects, name, domain="default")

def user(name, password, proj, role):
    u = ks.users.list(name=name)
    u = u[0] if u else ks.users.create(name=name, password=password, domain="default",
                                       default_project=proj)
    r = ks.roles.list(name=role)[0]
    ks.roles.grant(r, user=u, project=proj)
    return u

service = project("service")
for name in ("glance", "placement", "nova", "neutron"):
    user(name, e["SERVICE_PW"], service, "admin")
    ks.roles.grant(ks.roles.list(name="service")[0] if ks.roles.list(name="service")
                   else ks.roles.create(name="service"),
                   user=ks.users.list(name=name)[0], project=service)
fp = project("freshpool")
user("freshpool", e["USER_PW"], fp, "member")

for kind, name, url in (
    ("image", "glance", f"http://127.0.0.1:{e['GLANCE_PORT']}"),
    ("placement", "placement", f"http://127.0.0.1:{e['PLACEMENT_PORT']}"),
    ("compute", "nova", f"http://127.0.0.1:{e['NOVA_PORT']}/v2.1"),
    ("network", "neutron", f"http://127.0.0.1:{e['NEUTRON_PORT']}"),
):
    svc = [s for s in ks.services.list(type=kind)]
    svc = svc[0] if svc else ks.services.create(name=name, type=kind)
    have = {ep.interface: ep for ep in ks.endpoints.list(service=svc)}
    for interface in ("public", "internal", "admin"):
        if interface not in have:
            ks.endpoints.create(service=svc, url=url, interface=interface, region="RegionOne")
        elif have[interface].url != url:
            ks.endpoints.update(have[interface], url=url)
EOF
}

glance() {
    local conf=$ETC/glance/glance-api.conf
    if [ ! -f "$BASE/glance/.done" ]; then
        step "glance: db_sync"
        glance-manage --config-file "$conf" db_sync >>"$LOGS/glance-manage.log" 2>&1
        touch "$BASE/glance/.done"
    fi
    start glance glance-api --config-file "$conf"
    wait_http glance "http://127.0.0.1:$GLANCE_PORT/"
}

placement() {
    local conf=$ETC/placement/placement.conf
    if [ ! -f "$BASE/placement/.done" ]; then
        step "placement: db sync"
        placement-manage --config-file "$conf" db sync
        touch "$BASE/placement/.done"
    fi
    uwsgi_app placement $PLACEMENT_PORT /usr/bin/placement-api \
        "OS_PLACEMENT_CONFIG_DIR=$ETC/placement"
}

neutron() {
    local conf=$ETC/neutron/neutron.conf
    if [ ! -f "$BASE/neutron/.done" ]; then
        step "neutron: db upgrade"
        neutron-db-manage --config-file "$conf" upgrade heads >>"$LOGS/neutron-db-manage.log" 2>&1
        touch "$BASE/neutron/.done"
    fi
    start neutron neutron-server --config-file "$conf"
    wait_http neutron "http://127.0.0.1:$NEUTRON_PORT/"
    # No L2 agent runs (nothing is plugged: the virt driver is fake), so ML2's
    # openvswitch driver is shown one on the compute host, for ever alive (heartbeat in
    # 2099), with vxlan tunnels: its ports bind (vif_type ovs) instead of failing.
    runuser -u postgres -- psql -h "$BASE/pg/run" -p $PG_PORT -U postgres -qtA neutron <<EOF
INSERT INTO agents (id, agent_type, "binary", topic, host, admin_state_up, created_at,
                    started_at, heartbeat_timestamp, configurations, load, resources_synced)
SELECT '6f7eb9a4-5d8e-4c29-9d2a-f2e0c0ffee01', 'Open vSwitch agent', 'neutron-openvswitch-agent',
       'N/A', '$COMPUTE_HOST', true, now(), now(), '2099-01-01 00:00:00',
       '{"tunnel_types": ["vxlan"], "bridge_mappings": {}, "datapath_type": "system", "ovs_hybrid_plug": false, "tunneling_ip": "127.0.0.1"}',
       0, true
WHERE NOT EXISTS (SELECT 1 FROM agents WHERE host = '$COMPUTE_HOST');
EOF
}

nova() {
    local conf=$ETC/nova/nova.conf
    local manage=(nova-manage --config-file "$conf")
    if [ ! -f "$BASE/nova/.done" ]; then
        step "nova: api_db sync, cell0, cell1, db sync"
        "${manage[@]}" api_db sync >>"$LOGS/nova-manage.log" 2>&1
        "${manage[@]}" cell_v2 map_cell0 --database_connection "$DB/nova_cell0" >>"$LOGS/nova-manage.log" 2>&1
        local cells
        cells=$("${manage[@]}" cell_v2 list_cells 2>/dev/null)
        [[ $cells == *" cell1 "* ]] || "${manage[@]}" cell_v2 create_cell --name cell1 >>"$LOGS/nova-manage.log" 2>&1
        "${manage[@]}" db sync >>"$LOGS/nova-manage.log" 2>&1
        touch "$BASE/nova/.done"
    fi
    uwsgi_app nova-api $NOVA_PORT /usr/bin/nova-api-wsgi \
        "OS_NOVA_CONFIG_DIR=$ETC/nova" "OS_NOVA_CONFIG_FILES=api-paste.ini;nova.conf"
    start nova-conductor nova-conductor --config-file "$conf" --log-file "$LOGS/nova-conductor.log"
    start nova-scheduler nova-scheduler --config-file "$conf" --log-file "$LOGS/nova-scheduler.log"
    # Debian's nova-compute package pulls in libvirt and qemu for nothing: the fake
    # driver needs only python3-nova, whose entry point this is.
    start nova-compute $PY -c 'import sys; from nova.cmd.compute import main; sys.argv[0] = "nova-compute"; sys.exit(main())' \
        --config-file "$ETC/nova/nova-compute.conf" --log-file "$LOGS/nova-compute.log"
    local i
    # (Outputs read whole: `| grep -q` under pipefail fails when grep stops reading.)
    for ((i = 0; i < 120; i++)); do
        hosts=$("${manage[@]}" cell_v2 list_hosts 2>/dev/null || true)
        [[ $hosts == *" $COMPUTE_HOST "* ]] && break
        "${manage[@]}" cell_v2 discover_hosts >>"$LOGS/nova-manage.log" 2>&1 || true
        alive nova-compute || { tail -20 "$LOGS/nova-compute.out" >&2; exit 1; }
        sleep 1
    done
    [[ $hosts == *" $COMPUTE_HOST "* ]] \
        || { echo "nova-compute never registered; see $LOGS/nova-compute.log" >&2; exit 1; }
    step "nova: compute host $COMPUTE_HOST in cell1"
}

resources() {  # a flavor, an image, a shared network: what the test launches with
    step "cloud: flavors, image, network"
    OS_AUTH_URL=$KS/v3 ADMIN_PW=$ADMIN_PW BASE=$BASE $PY - <<'EOF'
import os
import openstack

e = os.environ
conn = openstack.connect(auth_url=e["OS_AUTH_URL"], username="admin", password=e["ADMIN_PW"],
                         project_name="admin", user_domain_name="Default",
                         project_domain_name="Default", region_name="RegionOne")
for name, vcpus, ram, disk in (("fp.tiny", 1, 256, 1), ("fp.small", 2, 512, 1)):
    if conn.compute.find_flavor(name) is None:
        conn.compute.create_flavor(name=name, vcpus=vcpus, ram=ram, disk=disk, is_public=True)
if conn.image.find_image("fp-tiny") is None:
    path = os.path.join(e["BASE"], "fp-tiny.raw")
    with open(path, "wb") as f:
        f.write(b"\0" * 1024 * 1024)  # the fake virt driver never reads it
    conn.create_image("fp-tiny", filename=path, disk_format="raw", container_format="bare",
                      visibility="public", wait=True)
net = conn.network.find_network("fp-net")
if net is None:
    net = conn.network.create_network(name="fp-net", shared=True)
if not list(conn.network.subnets(network_id=net.id)):
    # TEST-NET-1 (RFC 5737): nothing is plugged, no packet ever goes there.
    conn.network.create_subnet(name="fp-subnet", network_id=net.id, ip_version=4,
                               cidr="192.0.2.0/24", enable_dhcp=False, gateway_ip=None)
EOF
}

clouds_yaml() {
    cat >"$BASE/clouds.yaml" <<EOF
clouds:
  freshpool-real:
    auth:
      auth_url: $KS/v3
      username: freshpool
      password: $USER_PW
      project_name: freshpool
      user_domain_name: Default
      project_domain_name: Default
    region_name: RegionOne
    identity_api_version: 3
    interface: public
  freshpool-real-admin:
    auth:
      auth_url: $KS/v3
      username: admin
      password: $ADMIN_PW
      project_name: admin
      user_domain_name: Default
      project_domain_name: Default
    region_name: RegionOne
    identity_api_version: 3
    interface: public
EOF
}

install_packages
write_configs
postgres
rabbitmq
keystone
register
glance
placement
neutron
nova
resources
clouds_yaml
step "ready"
echo "clouds.yaml: $BASE/clouds.yaml"
echo "export OS_CLIENT_CONFIG_FILE=$BASE/clouds.yaml OS_CLOUD=freshpool-real"
echo "export FRESHPOOL_OPENSTACK_REAL_CLOUDS=$BASE/clouds.yaml"
