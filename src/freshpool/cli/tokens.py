"""`freshpool token ...`: API tokens, made and revoked on the store directly (as the operator)."""

from __future__ import annotations

import json
import time
from typing import Annotated

import typer
from rich.table import Table

from freshpool.cli.app import ConfigOpt, JsonOpt, app, friendly, group, opened, out, short_age

token_app = group("API tokens (bearer tokens bound to a tenant).")
app.add_typer(token_app, name="token")


@token_app.command("create")
@friendly
def token_create(
    tenant: Annotated[str, typer.Option("--tenant", "-t", help="The tenant the token acts for.")],
    description: Annotated[str, typer.Option(help="What the token is for.")] = "",
    config_path: ConfigOpt = None,
) -> None:
    """Make a token and print it once; only its hash is kept."""
    from freshpool.api import tokens

    with opened(config_path) as (config, store):
        row, secret = tokens.create(store, tenant, description)
        admin = tenant in config.api.admin_tenants
    # The secret alone on stdout, so `TOKEN=$(freshpool token create -t ci)` works.
    print(secret)
    typer.echo(
        f"token {row.id} for tenant {tenant}{' (admin)' if admin else ''}; it is not shown again",
        err=True,
    )


@token_app.command("list")
@friendly
def token_list(as_json: JsonOpt = False, config_path: ConfigOpt = None) -> None:
    """Every token: tenant, age, last use (never the token itself)."""
    with opened(config_path) as (_config, store):
        rows = store.tokens()
    if as_json:
        out.print_json(
            json.dumps(
                [
                    {
                        "id": r.id,
                        "tenant": r.tenant,
                        "description": r.description,
                        "created_at": r.created_at,
                        "last_used_at": r.last_used_at,
                        "revoked": r.revoked,
                    }
                    for r in rows
                ]
            )
        )
        return
    table = Table("ID", "TENANT", "AGE", "LAST USED", "STATE", "DESCRIPTION", box=None)
    now = time.time()
    for r in rows:
        table.add_row(
            str(r.id),
            r.tenant,
            short_age(now - r.created_at),
            f"{short_age(now - r.last_used_at)} ago" if r.last_used_at else "never",
            "revoked" if r.revoked else "active",
            r.description,
        )
    out.print(table)


@token_app.command("revoke")
@friendly
def token_revoke(
    token_id: Annotated[int, typer.Argument(metavar="ID")], config_path: ConfigOpt = None
) -> None:
    """Revoke a token: the API refuses it within 2 s (its answers are cached that long)."""
    with opened(config_path) as (_config, store):
        row = store.revoke_token(token_id)
    out.print(f"token {row.id} ({row.tenant}): revoked", highlight=False)
