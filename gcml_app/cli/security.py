"""``gcml certs`` and ``gcml token new``: a trial PKI and partner tokens."""

from __future__ import annotations

import argparse
import time


def _certs(args: argparse.Namespace) -> int:
    from gcml_app.site.certs import write_trial_pki

    sites = args.sites.split(",")
    hosts: dict[str, list[str]] = {}
    for item in args.hosts or []:
        site, sep, names = item.partition("=")
        if not sep or site not in sites or not names:
            raise SystemExit(f"gcml certs --hosts: found {item!r}; expected SITE=HOST[,HOST...] with SITE one of {sites}")
        hosts.setdefault(site, []).extend(n.strip() for n in names.split(",") if n.strip())
    paths = write_trial_pki(args.out, sites, hosts)
    shared = [s for s in sites if s not in hosts]
    if len(shared) > 1:
        print(f"note: {shared} got only loopback names: fine on one machine, but each of their certificates is valid "
              "for the others' loopback URLs; give each site its own names with --hosts SITE=HOST,...")
    print(f"trial CA {paths['ca']}; its key is in {paths['ca_key']}: keep it offline, never hand it to a site.")
    print(f"For each site, <site>.pem and <site>.key in {args.out}:")
    print("  serve: {tls: {certfile: <site>.pem, keyfile: <site>.key, ca_certs: ca.pem, client_certs: required}}")
    print("  gossip: {ca_bundle: ca.pem, client_cert: <site>.pem, client_key: <site>.key}")
    return 0


def _token_new(args: argparse.Namespace) -> int:
    import secrets

    from gcml_app.site.guard import hash_token

    token = secrets.token_urlsafe(32)
    token_id = args.id or f"{args.peer}-{time.strftime('%Y%m%d')}"
    print(f"New token for partner {args.peer} (shown once; give it to {args.peer} over a secure channel):")
    print(f"  {token}")
    print(f"{args.peer} puts it in its YAML as gossip.peers[].token_env (an environment variable holding it).")
    print("You add this line under security.peer_tokens in your site YAML (the server re-reads it, no restart):")
    print(f"  - {{id: {token_id}, peer: {args.peer}, sha256: {hash_token(token)}}}")
    print("To rotate: keep the old line until the partner uses the new token, then delete the old line.")
    return 0


def _site_name(v: str) -> str:
    from gcml_app.config import check_site_name

    try:
        return check_site_name(v)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """The ``gcml`` subcommands of this module."""
    s = sub.add_parser("certs", help="a trial CA and per-site certificates (HTTPS and mutual TLS between sites)")
    s.add_argument("--out", required=True)
    s.add_argument("--sites", required=True, help="comma-separated site names, e.g. site-a,site-b,site-c")
    s.add_argument("--hosts", action="append", metavar="SITE=HOST[,HOST...]",
                   help="a site's own host names and addresses (repeat per site); default loopback only")
    s.set_defaults(func=_certs)

    s = sub.add_parser("token", help="partner tokens")
    tok = s.add_subparsers(dest="token_cmd", required=True)
    s = tok.add_parser("new", help="make a token for a partner: print it once, and the hash for your YAML")
    s.add_argument("--peer", required=True, type=_site_name, help="the partner's site name")
    s.add_argument("--id", default=None, type=_site_name, help="token id for the audit log (default: PEER-YYYYMMDD)")
    s.set_defaults(func=_token_new)
