"""sds.gatewayapi.regex: the patterns Envoy accepts as google_re2 ``safe_regex``, and not."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from envoymesh.envoyconf import envoy_binary
from sds.gatewayapi.regex import MAX_PATTERN_BYTES, MAX_PROGRAM_SIZE, check

ACCEPTED = [
    "/api/v[0-9]+/.*",
    "/users/[^/]+",
    "(?i)/Admin",
    "^/exact$",
    "é+",
    r"[a-z]{1,40}\.example\.com",  # program size 95
    "a{96}",  # program size 100: exactly Envoy's limit
]
REFUSED = [
    ("(?=x)", "not a valid RE2 pattern"),  # lookahead: RE2 has none
    (r"(a)\1", "not a valid RE2 pattern"),  # backreference
    ("[", "not a valid RE2 pattern"),
    ("a{97}", "program size is 101"),  # valid RE2, too big for Envoy
    (r"[a-z]{1,63}\.example\.com", "too complex"),  # a plausible pattern, program size 141
    ("", "empty"),
    ("/a\x00b", "NUL"),
    ("\ud800", "UTF-8"),
    ("a" * (MAX_PATTERN_BYTES + 1), "bytes long"),
]


@pytest.mark.parametrize("pattern", ACCEPTED)
def test_accepted(pattern: str) -> None:
    assert check(pattern) is None


@pytest.mark.parametrize(("pattern", "reason"), REFUSED)
def test_refused(pattern: str, reason: str) -> None:
    found = check(pattern)
    assert found is not None
    assert reason in found


def test_reason_is_short_and_printable() -> None:
    found = check("(" * 5 + "\x01" + "x" * 500)
    assert found is not None
    assert len(found) < 200
    assert found.isprintable()


def test_limit_is_envoys_default() -> None:
    assert MAX_PROGRAM_SIZE == 100


def _envoy_accepts(pattern: str, run_dir: Path) -> bool:
    """Whether Envoy's config validation takes a route matching on ``pattern``."""
    router = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
    hcm = (
        "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3."
        "HttpConnectionManager"
    )
    route = {"match": {"safe_regex": {"regex": pattern}}, "direct_response": {"status": 200}}
    config = {
        "static_resources": {
            "listeners": [
                {
                    "name": "l",
                    "address": {"socket_address": {"address": "127.0.0.1", "port_value": 1}},
                    "filter_chains": [
                        {
                            "filters": [
                                {
                                    "name": "envoy.filters.network.http_connection_manager",
                                    "typed_config": {
                                        "@type": hcm,
                                        "stat_prefix": "s",
                                        "http_filters": [
                                            {
                                                "name": "envoy.filters.http.router",
                                                "typed_config": {"@type": router},
                                            }
                                        ],
                                        "route_config": {
                                            "virtual_hosts": [
                                                {"name": "v", "domains": ["*"], "routes": [route]}
                                            ]
                                        },
                                    },
                                }
                            ]
                        }
                    ],
                }
            ]
        }
    }
    path = run_dir / "envoy.json"
    path.write_text(json.dumps(config))
    done = subprocess.run(
        [envoy_binary(), "--mode", "validate", "-c", str(path), "-l", "critical"],
        capture_output=True,
        timeout=60,
        check=False,
    )
    return done.returncode == 0


@pytest.mark.envoy
@pytest.mark.parametrize(
    "pattern",
    ACCEPTED + [p for p, _ in REFUSED if "\x00" not in p and "\ud800" not in p],
)
def test_envoy_agrees(pattern: str, tmp_path: Path) -> None:
    # NUL and lone surrogates cannot be put in Envoy's JSON config at all, so are left out.
    assert _envoy_accepts(pattern, tmp_path) == (check(pattern) is None)
