"""``arborl ops ACTION``: operate a running run through the gateway's admin API.

    arborl ops status                      controls, served version, last actions
    arborl ops pause-training | resume-training
    arborl ops pause-serving [--drain] | resume-serving
    arborl ops rollback VERSION            serve that committed version again, pinned
    arborl ops promote [VERSION]           serve VERSION (default: the newest), follow the learner again
    arborl ops set lr=1e-6 max_staleness=2
    arborl ops log [--last N]              who did what, when

The gateway is found in ``RUN/up.json`` (written by ``arborl up``) unless ``--gateway`` names
it; the admin key comes from ``--admin-token``, ``ARBORL_ADMIN_TOKEN`` or ``RUN/admin_token``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import httpx

ACTIONS = ("status", "pause-training", "resume-training", "pause-serving", "resume-serving", "rollback", "promote",
           "set", "log")


def add_ops_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=ACTIONS)
    parser.add_argument("values", nargs="*", help="rollback/promote: VERSION; set: lr=X max_staleness=N")
    parser.add_argument("--run-dir", type=Path, default=Path("runs/default"))
    parser.add_argument("--gateway", help="the gateway's root URL (default: from RUN/up.json)")
    parser.add_argument("--admin-token", help="an admin key (default: ARBORL_ADMIN_TOKEN or RUN/admin_token)")
    parser.add_argument("--drain", action="store_true", help="pause-serving: wait until no request is running")
    parser.add_argument("--last", type=int, default=20, help="log: how many actions")


def _gateway(args: argparse.Namespace) -> str:
    if args.gateway:
        return args.gateway.rstrip("/")
    state = args.run_dir / "up.json"
    if state.is_file():
        return json.loads(state.read_text())["url"]
    return "http://127.0.0.1:8000"


def _token(args: argparse.Namespace) -> str:
    token = args.admin_token or os.environ.get("ARBORL_ADMIN_TOKEN")
    path = args.run_dir / "admin_token"
    if not token and path.is_file():
        token = path.read_text().strip()
    if not token:
        raise SystemExit("arborl: no admin key: pass --admin-token, set ARBORL_ADMIN_TOKEN, or use --run-dir of an "
                         "`arborl up` run")
    return token


def _call(args: argparse.Namespace, method: str, route: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
    url = _gateway(args) + route
    try:
        response = httpx.request(method, url, json=body, headers={"authorization": f"Bearer {_token(args)}"},
                                 timeout=3600)
    except httpx.HTTPError as exc:
        raise SystemExit(f"arborl: the gateway at {_gateway(args)} cannot be reached: {exc}") from None
    data = response.json() if response.headers.get("content-type", "").startswith("application/json") else {}
    if response.status_code != 200:
        message = (data.get("error") or {}).get("message") if isinstance(data.get("error"), dict) else response.text
        raise SystemExit(f"arborl: {route} answered {response.status_code}: {message}")
    return data


def _version(values: list[str], *, required: bool) -> int | None:
    if not values:
        if required:
            raise SystemExit("arborl: give the version")
        return None
    try:
        return int(values[0])
    except ValueError:
        raise SystemExit(f"arborl: a version is a whole number, not {values[0]!r}") from None


def _settings(values: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in values:
        key, _, value = item.partition("=")
        if key not in ("lr", "max_staleness") or not value:
            raise SystemExit(f"arborl: set takes lr=X and/or max_staleness=N, not {item!r}")
        try:
            out[key] = float(value) if key == "lr" else int(value)
        except ValueError:
            raise SystemExit(f"arborl: {key} must be a number, not {value!r}") from None
    if not out:
        raise SystemExit("arborl: set takes lr=X and/or max_staleness=N")
    return out


def _when(at: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(at))


def ops_command(args: argparse.Namespace) -> None:
    action = args.action
    if action == "status":
        controls = _call(args, "GET", "/admin/controls")
        for key, value in controls.items():
            print(f"{key}: {value}")
        return
    if action == "log":
        for entry in _call(args, "GET", f"/admin/actions?last={args.last}")["actions"]:
            print(f"{_when(entry['at'])}  {entry['who']:<12} {entry['action']:<16} {json.dumps(entry['details'])}")
        return
    routes = {
        "pause-training": ("/admin/training/pause", dict),
        "resume-training": ("/admin/training/resume", dict),
        "pause-serving": ("/admin/serving/pause", lambda: {"drain": args.drain}),
        "resume-serving": ("/admin/serving/resume", dict),
        "rollback": ("/admin/rollback", lambda: {"version": _version(args.values, required=True)}),
        "promote": ("/admin/promote", lambda: {"version": _version(args.values, required=False)}),
        "set": ("/admin/learner", lambda: _settings(args.values)),
    }
    route, body = routes[action]
    result = _call(args, "POST", route, body())
    extra = {k: v for k, v in result.items() if k not in ("id", "at", "who", "action", "details")}
    print(f"{action}: done by {result.get('who')} at {_when(result.get('at', time.time()))}"
          + (f" {json.dumps(extra)}" if extra else ""))
