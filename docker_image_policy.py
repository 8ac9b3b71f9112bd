#!/usr/bin/env python3
"""docker-image-policy: a Docker Engine authorization plugin that decides which
images a Docker host may pull, load, build and run.

Run it (as root, before dockerd starts):

    python3 docker_image_policy.py --config /etc/docker/docker-image-policy.json

and enable it in /etc/docker/daemon.json:

    {"authorization-plugins": ["docker-image-policy"]}

The configuration is the original plugin's: regular expressions in
"whitelist" and "blacklist" (RE2, read as Go's regexp reads them) and a
"defaultAllow" fallback, matched against
the familiar form of every image reference (nginx:1.25), as the original
plugin matched them, and also against the canonical form
(docker.io/library/nginx:1.25) when they name docker.io. A whitelist match
allows, then a blacklist match denies, then defaultAllow decides.

Security note: the plugin sees every Docker API call before dockerd acts on
it and reads each one the way dockerd does (Go's encoding/json for bodies).
Pulls, container creation (with its image mounts), services, plugin installs
and retags are checked by image name, and in scopes with "signedBy" by a
cosign signature of the image's digest (at the registry for a pull, by the
digest an image on the host was pulled by for a run or retag); loads,
imports, builds, commits, plugin creation and joining a swarm, whose effect
it cannot see, are allowed or denied as a whole. Anything on those routes
that it cannot fully understand is denied. It cannot protect against users who bypass dockerd
(the containerd socket), swarm workers pulling for a service created
elsewhere, files copied into a running container (docker cp, exec), or users
who can already run privileged containers.

The module reads in the order a request flows through the daemon: image
references, signatures, Go's decoding, rules, the policy and its file,
requests and their bodies, the Docker API, routes, the registry client, the
decision log and metrics, the plugin, its handlers and its servers. What
runs offline follows: policy tests, --check, --scan and --replay, the
linter, and the command line. Each operation is one Operation value, at the
top, carrying every name it goes by.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import bisect
import codecs
import collections
import contextlib
import dataclasses
import datetime
import difflib
import functools
import http.client
import importlib
import ipaddress
import itertools
import json
import math
import operator
import os
import queue
import re
import signal
import socket
import socketserver
import ssl
import stat
import sys
import threading
import time
import unicodedata
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import MappingProxyType
from typing import Any, Callable, Iterable, NamedTuple, NoReturn
from urllib.parse import quote, unquote_to_bytes, urlencode, urljoin, urlsplit

if sys.version_info < (3, 11):
    raise SystemExit(f"docker-image-policy needs Python 3.11 or newer, not {sys.version.split()[0]}"
                     " (Debian 12 and Ubuntu 24.04 have it)")

# One SHA-256 per policy load: CPython's own, as hashlib would load OpenSSL (4 MB resident).
sha256: Any
try:
    sha256 = importlib.import_module("_sha256").sha256         # CPython 3.11
except ImportError:
    try:
        sha256 = importlib.import_module("_sha2").sha256       # CPython 3.12 and newer
    except ImportError:
        sha256 = importlib.import_module("hashlib").sha256

try:   # the stdlib's own parser gives exact literal prefixes; trusted_prefix checks them
    regex_parser: Any = importlib.import_module("re._parser")
except ImportError:
    regex_parser = None

__version__ = "2.0.2"

PLUGIN_NAME = "docker-image-policy"
# The original plugin's paths and port: service files and scripts rely on them.
DEFAULT_CONFIG = "/etc/docker/docker-image-policy.json"
DEFAULT_SOCKET = "/run/docker/plugins/docker-image-policy.sock"   # dockerd finds plugins here by name
DEFAULT_ADDR = "127.0.0.1:5006"                                   # loopback: the admin listener has no auth
DEFAULT_DOCKER_HOST = "unix:///var/run/docker.sock"

# dockerd forwards request bodies up to 4 MiB, base64-encoded in the JSON
# (about 5.5 MB), and AuthZRes adds the response it captured. 16 MiB holds
# both with room to spare; an AuthZRes beyond it is discarded unread.
MAX_BODY = 16 * 1024 * 1024
# An AuthZ request this large carries a forwarded body of 700 KB or more:
# such requests are read and decided a few at a time, so that many of them at
# once (any Docker API user can send them) cannot take the host's memory.
LARGE_REQUEST = 1024 * 1024
LARGE_REQUESTS_AT_ONCE = 2
# No container or service dockerd creates has a body of this many JSON values
# (objects, arrays and the commas between values); decoding one costs tens of
# MB of Python objects, so a body with more is denied unread.
MAX_BODY_VALUES = 100_000
# Each image a container mounts is judged, some by asking dockerd: a container
# mounts a few; more is refused rather than keeping the plugin busy for seconds.
MAX_IMAGE_MOUNTS = 64
# dockerd (Go's net/http) reads at most 1 MiB and 4 KiB of request line and
# headers, so no RequestUri it forwards is longer: a longer one is denied
# before it is parsed, which bounds the copies parsing makes.
MAX_TARGET = 1024 * 1024 + 4096
# dockerd's requests are a short line and a few headers; anything near these
# limits is not dockerd, and is answered with an error instead of memory.
MAX_REQUEST_LINE = 8192
MAX_HEADER_LINE = 8192
MAX_HEADERS = 100
# dockerd keeps idle plugin connections open without limit, and a call it
# writes as the plugin closes the connection fails once (see EMPTY_REQUEST):
# a long idle timeout makes that rare and frees only threads held by stalled
# or vanished clients, which only root can be on the plugin socket.
IDLE_TIMEOUT = 3600.0
# Decisions are remembered per request body, for the running policy only
# (docker ps, health checks and CI steps repeat the same calls); bounded.
CACHE_BODY_MAX = 4096
CACHE_ENTRIES = 512
# Decision lines reach stderr within this many seconds, in batches; while
# stderr does not take them (a stalled journald), at most this many bytes
# wait (about 4,000 decision lines) and later lines are dropped and counted.
LOG_FLUSH_INTERVAL = 0.2
MAX_PENDING_BYTES = 1024 * 1024
# Text a request controls (a query, a path, a header name) is shown in
# reasons and log lines cut to this many characters, with its length: one
# request cannot make the plugin write, keep or answer a long line.
SHOWN_TEXT = 200
# No field of a decision line is longer than this once JSON-encoded, whatever
# its source (a long rule of the policy too), so that a decision line stays
# under 8 KiB: journald splits lines longer than its LineMax (48 KiB by
# default), which breaks one JSON object per line for --replay.
MAX_LOG_FIELD = 1024
# While another process holds the admin address, the plugin serves dockerd
# and tries the address again this often: one bind() each time.
ADMIN_RETRY_INTERVAL = 2.0
# Image inspection runs while dockerd waits for our answer: keep it short.
DOCKER_API_TIMEOUT = 3.0
# --scan lists every image and container at once, with nobody waiting on it:
# a daemon with thousands of them takes longer than a single lookup.
SCAN_TIMEOUT = 60.0

CONFIG_DEFAULTS: MappingProxyType[str, Any] = MappingProxyType({
    "whitelist": [],
    "blacklist": [],
    "scopes": [],            # see compile_scope_entry
    "defaultAllow": False,
    "mode": "enforce",
    "checkRun": True,
    "allowBuild": None,      # None: follows defaultAllow
    "allowCommit": None,
    "allowImport": None,
    "allowLoad": None,
    "allowPluginCreate": None,
    "allowSwarm": None,
    "message": "",
    "tests": [],             # the policy's own expectations: see compile_tests
})
MODES = frozenset({"enforce", "audit"})


@dataclass(frozen=True, eq=False)
class Operation:
    """What a request does with images, by every name it goes by: one value per operation.

    name: in decision lines, metrics and messages ("pull (all tags)").
    command: in --check --operation and policy tests ("pull-all-tags"); none
    for what no docker command sends alone. key and why: the setting that
    decides an operation whose content the plugin cannot see. request: the
    AuthZReq dockerd sends for the docker command (image, new name). replay:
    how --replay makes a logged decision of it again.
    """

    name: str
    command: str = ""
    key: str = ""
    why: str = ""
    request: Callable[[str, str], dict[str, Any]] | None = None
    replay: Callable[[Operation, Policy, dict[str, Any]], Decision] | None = None

    def __str__(self) -> str:
        return self.name

    @property
    def opaque(self) -> bool:
        return bool(self.key)


# Every operation, in the order --operation lists them. Its lambdas are the
# one place the module reaches forward: they are called only by the offline
# tools, at the end, and name the routes' deciders and the functions of
# "Judging without dockerd" and "Offline tools" that make a docker command's
# request and decide a logged decision again.
PULL = Operation("pull", "pull", request=lambda image, target: _pull_request(image),
                 replay=lambda operation, policy, record: decide_pull(policy, canonical_reference(record["image"]), False))
PULL_ALL_TAGS = Operation(
    "pull (all tags)", "pull-all-tags",
    request=lambda image, target: client_request(f"/images/create?fromImage={quote(image, safe='')}"),
    replay=lambda operation, policy, record: decide_pull(policy, canonical_reference(record["image"]), True))
RUN = Operation("run", "run", request=lambda image, target: client_request("/containers/create", {"Image": image}),
                replay=lambda operation, policy, record: _replay_image(operation, policy, record))
TAG = Operation("tag", "tag", request=lambda image, target: client_request(
                    f"/images/{quote(image, safe='/:@')}/tag?repo={quote(target, safe='')}"),
                replay=lambda operation, policy, record: _replay_tag(policy, record))
SERVICE = Operation("service", "service", request=lambda image, target: _service_request(image),
                    replay=lambda operation, policy, record: _replay_image(operation, policy, record))
PLUGIN_INSTALL = Operation(
    "plugin install", "plugin-install",
    request=lambda image, target: client_request(f"/plugins/pull?remote={quote(image, safe='')}"),
    replay=lambda operation, policy, record: _replay_image(operation, policy, record))


def _opaque(name: str, key: str, why: str, path: str) -> Operation:
    return Operation(name, name, key, why, request=lambda image, target: client_request(path),
                     replay=lambda operation, policy, record: decide_opaque(policy, operation))


BUILD = _opaque("build", "allowBuild", "the plugin cannot see the Dockerfile or the base images dockerd will pull"
                " for it", "/build")
COMMIT = _opaque("commit", "allowCommit", "the plugin cannot see what the container holds", "/commit")
IMPORT = _opaque("import", "allowImport", "the plugin cannot see what the archive or URL holds",
                 "/images/create?fromSrc=-")
LOAD = _opaque("load", "allowLoad", "the plugin cannot see which images the archive holds", "/images/load")
PLUGIN_CREATE = _opaque("plugin-create", "allowPluginCreate", "the plugin cannot see what the archive holds",
                        "/plugins/create")
SWARM = _opaque("swarm", "allowSwarm", "a swarm manager can then run any image on this host without asking any"
                " plugin", "/swarm/init")
# A run's image mounts, decided and logged apart from its image.
IMAGE_MOUNT = Operation("image mount", replay=lambda operation, policy, record: _replay_image(operation, policy, record))
# What a POST /images/create is until its query says which (an unreadable one stays so).
PULL_OR_IMPORT = Operation("pull or import")
# An AuthZReq read no further than its method and target.
REQUEST = Operation("request")
# Every request that can bring in or run no image.
OTHER_REQUEST = Operation("other")
OPERATIONS: MappingProxyType[str, Operation] = MappingProxyType({operation.name: operation for operation in (
    PULL, PULL_ALL_TAGS, RUN, TAG, SERVICE, PLUGIN_INSTALL, BUILD, COMMIT, IMPORT, LOAD, PLUGIN_CREATE, SWARM,
    IMAGE_MOUNT, PULL_OR_IMPORT, REQUEST, OTHER_REQUEST)})
# By the names --operation and policy tests use.
COMMANDS: MappingProxyType[str, Operation] = MappingProxyType(
    {operation.command: operation for operation in OPERATIONS.values() if operation.command})


class ImagePolicyError(Exception):
    """Base of every error this module reports to a user."""


class ConfigError(ImagePolicyError):
    """A configuration file that cannot be used; the message says where."""

    def __init__(self, path: str, where: str, problem: str) -> None:
        self.path, self.where, self.problem = path, where, problem
        super().__init__(f"{path}: {where}: {problem}" if where else f"{path}: {problem}")


class InvalidReference(ImagePolicyError):
    """An image reference that dockerd would reject or that is ambiguous."""


def shown(text: str) -> str:
    """repr(text) for a reason or a log line, cut to SHOWN_TEXT characters with its length."""
    if len(text) <= SHOWN_TEXT:
        return repr(text)
    return f"{text[:SHOWN_TEXT]!r}… ({len(text)} characters)"


def cut(text: str) -> str:
    """text (an error's repr, say) for a reason or a log line, cut as shown() cuts."""
    return text if len(text) <= SHOWN_TEXT else f"{text[:SHOWN_TEXT]}… ({len(text)} characters)"


# --------------------------------------------------------------------------
# Image references (github.com/distribution/reference, ParseNormalizedNamed)
# --------------------------------------------------------------------------

_DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_PATH_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
REFERENCE_RE = re.compile(rf"""
    (?P<name>
        (?:(?P<domain>
            (?:{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})* | \[[a-fA-F0-9:]+\])
            (?::[0-9]+)?
        )/)?
        (?P<path>{_PATH_COMPONENT}(?:/{_PATH_COMPONENT})*)
    )
    (?::(?P<tag>[0-9A-Za-z_][0-9A-Za-z_.-]{{0,127}}))?
    (?:@(?P<digest>[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{{32,}}))?
    """, re.VERBOSE | re.ASCII)
TAG_RE = re.compile(r"[0-9A-Za-z_][0-9A-Za-z_.-]{0,127}", re.ASCII)
# go-digest's registered algorithms: anything else is "unsupported digest".
DIGEST_RE = re.compile(r"sha256:[a-f0-9]{64}|sha384:[a-f0-9]{96}|sha512:[a-f0-9]{128}")
IMAGE_ID_RE = re.compile(r"[a-f0-9]{64}")
# dockerd looks any hex string up as a short image ID when no image has that
# name, so such names are resolved through the Docker API, never trusted.
IMAGE_ID_LIKE_RE = re.compile(r"(?:sha256:)?[a-f0-9]+")
# distribution/reference's limit on a whole name (registry and path); with a
# tag and a digest, no reference is longer than MAX_REFERENCE. Rules never
# see longer text, which keeps a quadratic pattern such as .*:latest$ cheap.
MAX_NAME = 255
MAX_REFERENCE = MAX_NAME + 1 + 128 + 1 + len("sha512:") + 128


# distribution/reference recognizes Docker Hub by exact, lower-case comparison:
# only these spellings get "library/" for a one-component path.
HUB_NAMES = frozenset({"docker.io", "index.docker.io"})
# Docker Hub serves the same repositories under these hosts too, and any
# registry serves its HTTPS port whether or not a name says ":443". Such a
# spelling is another name of the same repository, which blacklists catch;
# it is not one a whitelist rule written for the usual name admits: the
# HTTP fallback of an insecure registry, and a dotless host such as vm:443,
# would make it something else.
HUB_ALIASES = frozenset({"docker.io", "index.docker.io", "registry-1.docker.io", "registry.hub.docker.com"})
DEFAULT_PORTS = frozenset({443, 80})
# The containerd image store keeps an image that lost its last name while in
# use as moby-dangling@<digest>: a placeholder, never a name a rule may admit.
DANGLING_REPOSITORY = "docker.io/library/moby-dangling"


@dataclass(frozen=True)
class Reference:
    """A normalized image reference: docker.io/library/nginx:1.25@sha256:…

    alias is the same repository under its usual registry name, when the
    reference spells the registry another way (registry-1.docker.io/evil,
    quay.io:443/evil): blacklists are matched against both.
    """

    domain: str
    path: str
    tag: str | None = None
    digest: str | None = None

    repository: str = dataclasses.field(init=False, compare=False, repr=False)            # docker.io/library/nginx
    familiar_repository: str = dataclasses.field(init=False, compare=False, repr=False)   # nginx
    has_familiar_form: bool = dataclasses.field(init=False, compare=False, repr=False)
    alias: Reference | None = dataclasses.field(init=False, compare=False, repr=False)
    canonical: str = dataclasses.field(init=False, compare=False)
    familiar: str = dataclasses.field(init=False, compare=False)
    familiar_forms: tuple[str, ...] = dataclasses.field(init=False, compare=False, repr=False)
    all_forms: tuple[str, ...] = dataclasses.field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        # Computed once: every rule is matched against these forms.
        domain, path = self.domain, self.path
        repository = f"{domain}/{path}"
        has_familiar_form = domain != "docker.io" or "/" in path
        if domain != "docker.io":
            familiar_repository = repository
        elif path.startswith("library/") and path.count("/") == 1:
            familiar_repository = path[len("library/"):]
        else:
            # A one-component path reached through an alias (DOCKER.IO/nginx) is
            # not the official image (only the exact name docker.io adds library/)
            # and has no familiar form: only rules that name docker.io match it.
            familiar_repository = path if has_familiar_form else repository
        tag = self.tag if self.tag is not None or self.digest else "latest"
        suffix = (f":{tag}" if tag else "") + (f"@{self.digest}" if self.digest else "")
        usual = usual_host(domain)
        for name, value in (("repository", repository), ("familiar_repository", familiar_repository),
                            ("has_familiar_form", has_familiar_form),
                            ("canonical", repository + suffix), ("familiar", familiar_repository + suffix),
                            ("alias", Reference(usual, path, self.tag, self.digest) if usual != domain else None)):
            object.__setattr__(self, name, value)
        familiar, canonical = self.forms(False), self.forms(True)
        object.__setattr__(self, "familiar_forms", familiar)
        object.__setattr__(self, "all_forms", familiar if canonical == familiar else familiar + canonical)

    def forms(self, canonical: bool) -> tuple[str, ...]:
        r"""The strings rules are matched against: familiar, or canonical.

        A reference pinned by a digest is matched by the digest alone, as
        nginx@sha256:… and as the original plugin saw it (nginx:sha256:…,
        from fromImage and tag): dockerd fetches and runs the digest and
        ignores a tag written beside it, so ^nginx:1\.25 must not admit
        nginx:1.25@sha256:<anything>, while ^nginx: admits digest pins and
        :latest$ does not.
        """
        if not canonical and not self.has_familiar_form:
            return ()
        repository = self.repository if canonical else self.familiar_repository
        if self.digest:
            return f"{repository}@{self.digest}", f"{repository}:{self.digest}"
        return (self.canonical if canonical else self.familiar,)


@functools.lru_cache(maxsize=4096)
def parse_reference(text: str) -> Reference:
    """Parse a reference the way dockerd does (ParseNormalizedNamed)."""
    # name:tag, where a tag is often new (every CI build's): the name is parsed once, the tag checked.
    name, colon, tag = text.rpartition(":")
    if colon and TAG_RE.fullmatch(tag) and ":" not in name.rpartition("/")[2]:
        with contextlib.suppress(InvalidReference):   # then the whole text is parsed, to say why
            named = parse_reference(name)
            return Reference(named.domain, named.path, tag)
    return parse_whole_reference(text)


def parse_whole_reference(text: str) -> Reference:
    """parse_reference, the whole text at once: the grammar of distribution/reference."""
    if len(text) > MAX_REFERENCE:
        raise InvalidReference(f"invalid reference {text[:80]!r}…: longer than any valid reference")
    if IMAGE_ID_RE.fullmatch(text):
        raise InvalidReference(f"{text!r} is an image ID, not a repository name")
    slash = text.find("/")
    first = text[:slash]
    if slash == -1 or (not any(c in first for c in ".:") and first != "localhost" and first.lower() == first):
        domain, remainder = "docker.io", text
    else:
        domain, remainder = first, text[slash + 1:]
    if domain in HUB_NAMES and "/" not in remainder.split("@")[0].split(":")[0]:
        remainder = "library/" + remainder
    repository = remainder.split(":", 1)[0].split("@", 1)[0]
    if repository.lower() != repository:
        raise InvalidReference(f"invalid reference {text!r}: repository name must be lowercase")
    match = REFERENCE_RE.fullmatch(f"{domain}/{remainder}")
    if not match:
        raise InvalidReference(f"invalid reference format: {text!r}")
    if len(match["name"]) > MAX_NAME:
        raise InvalidReference(f"invalid reference {text[:80]!r}…: repository name longer than {MAX_NAME} characters")
    if match["digest"] and not DIGEST_RE.fullmatch(match["digest"]):
        raise InvalidReference(f"invalid reference {text!r}: unsupported or malformed digest")
    if match["domain"] is None:   # distribution would read "my_host.example/app" as a path with no registry
        raise InvalidReference(f"invalid reference {text!r}: {domain!r} is not a valid registry host name")
    return Reference(registry_host(match["domain"]), match["path"], match["tag"], match["digest"])


def usual_host(domain: str) -> str:
    """The usual name of a registry host: the port as a number, without :443 or :80, Docker Hub as docker.io.

    Go reads ":0443" as port 443, HTTPS is 443, and the HTTP fallback of an
    insecure registry is 80: each spelling reaches the same registry.
    """
    host, colon, port = domain.rpartition(":")
    if colon and host and port.isdigit():
        domain = host if int(port) in DEFAULT_PORTS else f"{host}:{int(port)}"
    return "docker.io" if domain in HUB_ALIASES else domain


def registry_host(domain: str) -> str:
    """The registry as dockerd will reach it: host names are case-insensitive on the network."""
    lowered = domain.lower()
    if not any(c in lowered for c in ".:") and lowered != "localhost":
        return domain   # "Foo/app": lower-casing would make it read as a Docker Hub user
    return "docker.io" if lowered in HUB_NAMES else lowered


def pull_reference(from_image: str, tag: str) -> tuple[Reference, bool]:
    """The reference dockerd pulls for fromImage and tag, and whether it pulls all tags."""
    # dockerd drops one trailing ":" ("pull -a" clients send "name:").
    reference = parse_reference(from_image[:-1] if from_image.endswith(":") else from_image)
    if tag:
        if DIGEST_RE.fullmatch(tag):
            return Reference(reference.domain, reference.path, None, tag), False
        if not TAG_RE.fullmatch(tag):
            raise InvalidReference(f"invalid tag {tag!r}")
        return Reference(reference.domain, reference.path, tag, reference.digest), False
    return reference, reference.tag is None and reference.digest is None


# --------------------------------------------------------------------------
# Signatures: ECDSA P-256 with SHA-256 (cosign's keys), public-key arithmetic only
# --------------------------------------------------------------------------

# NIST P-256 (FIPS 186-4, D.1.2.3): y² = x³ - 3x + b over GF(p), a group of prime order n.
P256_P = 0xffffffff00000001000000000000000000000000ffffffffffffffffffffffff
P256_N = 0xffffffff00000000ffffffffffffffffbce6faada7179e84f3b9cac2fc632551
P256_B = 0x5ac635d8aa3a93e7b3ebbd55769886bc651d06b0cc53b0f63bce3c3e27d2604b
P256_G = (0x6b17d1f2e12c4247f8bce6e563a440f277037d812deb33a0f4a13945d898c296,
          0x4fe342e2fe1a7f9b8ee7eb4a7c0f9e162bce33576b315ececbb6406837bf51f5)
# SubjectPublicKeyInfo {id-ecPublicKey, prime256v1} with an uncompressed point
# (04 X Y): DER allows one encoding of it, so a strict parse is this comparison.
P256_SPKI_PREFIX = bytes.fromhex("3059301306072a8648ce3d020106082a8648ce3d030107034200" "04")
# Compressed points (02/03 X) are refused, as Go's crypto/x509 (and so cosign) refuses them.
P256_SPKI_COMPRESSED = bytes.fromhex("3039301306072a8648ce3d020106082a8648ce3d030107032200")
PEM_PUBLIC_KEY = re.compile(r"""
    \s* -----BEGIN\ PUBLIC\ KEY-----\r?\n
    ((?:[A-Za-z0-9+/=]{1,76}\r?\n)+)         # base64 in lines, as openssl and cosign write it
    -----END\ PUBLIC\ KEY-----\s*""", re.VERBOSE)
PEM_LABEL = re.compile(r"-----BEGIN ([A-Z0-9 ]+)-----")
# Windowed multiplication: 4-bit windows, 16 precomputed multiples per point.
WINDOW_BITS = 4

JacobianPoint = tuple[int, int, int]   # (X, Y, Z) for the affine point (X/Z², Y/Z³); Z = 0 is infinity
INFINITY: JacobianPoint = (1, 1, 0)


def _double(point: JacobianPoint) -> JacobianPoint:
    """2P, with a = -3 (dbl-2001-b)."""
    x, y, z = point
    if not z:
        return INFINITY
    p = P256_P
    delta = z * z % p
    gamma = y * y % p
    beta = x * gamma % p
    alpha = 3 * (x - delta) * (x + delta) % p
    x3 = (alpha * alpha - 8 * beta) % p
    z3 = ((y + z) * (y + z) - gamma - delta) % p
    y3 = (alpha * (4 * beta - x3) - 8 * gamma * gamma) % p
    return x3, y3, z3


def _add(first: JacobianPoint, second: JacobianPoint) -> JacobianPoint:
    """P + Q for any two points: infinity, equal and opposite points included."""
    x1, y1, z1 = first
    x2, y2, z2 = second
    if not z1:
        return second
    if not z2:
        return first
    p = P256_P
    z1z1 = z1 * z1 % p
    if z2 == 1:   # the precomputed multiples are affine: fewer products
        u1, s1 = x1, y1
        u2, s2 = x2 * z1z1 % p, y2 * z1 * z1z1 % p
    else:
        z2z2 = z2 * z2 % p
        u1, s1 = x1 * z2z2 % p, y1 * z2 * z2z2 % p
        u2, s2 = x2 * z1z1 % p, y2 * z1 * z1z1 % p
    if u1 == u2:
        return _double(first) if s1 == s2 else INFINITY
    h = u2 - u1
    r = s2 - s1
    hh = h * h % p
    hhh = h * hh % p
    v = u1 * hh % p
    x3 = (r * r - hhh - 2 * v) % p
    y3 = (r * (v - x3) - s1 * hhh) % p
    return x3, y3, z1 * z2 * h % p


def _affine(point: JacobianPoint) -> JacobianPoint:
    x, y, z = point
    if not z:
        return INFINITY
    inverse = pow(z, -1, P256_P)
    square = inverse * inverse % P256_P
    return x * square % P256_P, y * square * inverse % P256_P, 1


def _multiples(x: int, y: int) -> tuple[JacobianPoint, ...]:
    """0P, 1P, ... 15P, affine, for the windowed multiplication."""
    multiples = [INFINITY, (x, y, 1)]
    for _ in range(2, 1 << WINDOW_BITS):
        multiples.append(_affine(_add(multiples[-1], (x, y, 1))))
    return tuple(multiples)


@functools.cache
def _generator_multiples() -> tuple[JacobianPoint, ...]:
    return _multiples(*P256_G)


def _shamir(u1: int, first: tuple[JacobianPoint, ...], u2: int, second: tuple[JacobianPoint, ...]) -> JacobianPoint:
    """u1·P + u2·Q with one pass of doublings (Shamir's trick), a window at a time."""
    mask = (1 << WINDOW_BITS) - 1
    point = INFINITY
    for shift in range(256 - WINDOW_BITS, -1, -WINDOW_BITS):
        for _ in range(WINDOW_BITS):
            point = _double(point)
        point = _add(_add(point, first[u1 >> shift & mask]), second[u2 >> shift & mask])
    return point


class InvalidKey(ImagePolicyError):
    """A public key this module cannot use; the message says why."""


@dataclass(frozen=True)
class PublicKey:
    """An ECDSA P-256 public key (a cosign key), with its multiples for verification."""

    source: str          # the file it came from, for messages
    der: bytes           # its SubjectPublicKeyInfo: what two keys are compared by
    multiples: tuple[JacobianPoint, ...] = dataclasses.field(repr=False, compare=False)

    @property
    def fingerprint(self) -> str:
        """sha256:<hex> of the SubjectPublicKeyInfo, as `openssl pkey -pubin -outform DER | sha256sum` shows it."""
        return "sha256:" + sha256(self.der).hexdigest()

    def verify(self, message: bytes, signature: bytes) -> bool:
        """Whether signature (DER ECDSA-Sig-Value) is this key's over SHA-256(message)."""
        values = der_signature(signature)
        if values is None:
            return False
        r, s = values
        digest = int.from_bytes(sha256(message).digest(), "big")
        inverse = pow(s, -1, P256_N)
        x, _, z = _shamir(digest * inverse % P256_N, _generator_multiples(), r * inverse % P256_N, self.multiples)
        return bool(z) and x * pow(z, -2, P256_P) % P256_P % P256_N == r


def public_key_from_der(der: bytes, source: str) -> PublicKey:
    """The key in a DER SubjectPublicKeyInfo, which must be ECDSA P-256 with a point on the curve."""
    if len(der) == len(P256_SPKI_COMPRESSED) + 33 and der.startswith(P256_SPKI_COMPRESSED) and der[-33] in (2, 3):
        raise InvalidKey("a compressed point; only uncompressed P-256 keys are accepted, as by cosign")
    if len(der) != len(P256_SPKI_PREFIX) + 64 or not der.startswith(P256_SPKI_PREFIX):
        raise InvalidKey("not an ECDSA P-256 public key (cosign's key type) in SubjectPublicKeyInfo DER")
    x = int.from_bytes(der[-64:-32], "big")
    y = int.from_bytes(der[-32:], "big")
    if x >= P256_P or y >= P256_P or (y * y - x * x * x + 3 * x - P256_B) % P256_P:
        raise InvalidKey("the public key's point is not on the P-256 curve")
    return PublicKey(source, der, _multiples(x, y))


def public_key_from_pem(text: str, source: str) -> PublicKey:
    """The key in one PEM PUBLIC KEY block (cosign.pub, or openssl's -pubout), and nothing else."""
    match = PEM_PUBLIC_KEY.fullmatch(text)
    if match is None:
        labels = PEM_LABEL.findall(text)
        if any("PRIVATE" in label for label in labels):
            raise InvalidKey("a private key; name the public key (cosign.pub) instead")
        found = f"found {', '.join(labels)}" if labels else "found no PEM block"
        raise InvalidKey(f"not one PEM 'PUBLIC KEY' block ({found})")
    try:
        der = binascii.a2b_base64("".join(match[1].split()), strict_mode=True)
    except binascii.Error as error:
        raise InvalidKey(f"the PEM block is not valid base64 ({error})") from None
    return public_key_from_der(der, source)


def der_signature(signature: bytes) -> tuple[int, int] | None:
    """(r, s) of a DER ECDSA-Sig-Value with 1 <= r, s < n; None for anything else (BER included)."""
    if len(signature) < 8 or signature[0] != 0x30 or signature[1] != len(signature) - 2:
        return None   # a P-256 signature is under 128 bytes: only the short length form is DER
    values = []
    position = 2
    for _ in range(2):
        if position + 2 > len(signature) or signature[position] != 0x02:
            return None
        length = signature[position + 1]
        content = signature[position + 2:position + 2 + length]
        if not 1 <= length <= 33 or len(content) != length:
            return None
        if content[0] & 0x80 or (length > 1 and content[0] == 0 and not content[1] & 0x80):
            return None   # negative, or not minimal
        values.append(int.from_bytes(content, "big"))
        position += 2 + length
    if position != len(signature) or not all(1 <= value < P256_N for value in values):
        return None
    return values[0], values[1]


def load_public_keys(paths: list[str] | tuple[str, ...]) -> tuple[PublicKey, ...]:
    """The keys in PEM files (cosign.pub); ConfigError naming the file that cannot be used."""
    keys: dict[bytes, PublicKey] = {}
    for path in paths:
        try:
            with open(path, encoding="ascii") as file:
                key = public_key_from_pem(file.read(4 * MAX_HEADER_LINE), path)
        except OSError as error:
            raise ConfigError(path, "", f"cannot read the public key: {error.strerror}") from None
        except UnicodeDecodeError:
            raise ConfigError(path, "", "not a PEM public key (not ASCII text)") from None
        except InvalidKey as error:
            raise ConfigError(path, "", str(error)) from None
        keys.setdefault(key.der, key)
    return tuple(keys.values())


# --------------------------------------------------------------------------
# Go's encoding/json: how dockerd reads request bodies, and the Go plugin its file
# --------------------------------------------------------------------------

# encoding/json matches keys to fields case-insensitively, but only ASCII
# letters fold, plus two runes whose case orbit reaches one: U+017F (ſ) and
# U+212A (Kelvin sign). Python's upper() folds far more (ı to I): never use it.
_GO_FOLD = {**{ord(c): c.upper() for c in "abcdefghijklmnopqrstuvwxyz"}, 0x17F: "S", 0x212A: "K"}


def go_fold(key: str) -> str:
    """A JSON key as encoding/json compares it with a field's name."""
    return key.upper() if key.isascii() else key.translate(_GO_FOLD)   # ASCII: upper() is the same, and fast


class JSONObject(list):
    """A JSON object as its (key, value) pairs, in order, duplicates kept."""


@dataclass(frozen=True)
class GoStruct:
    """The fields of a Go struct that matter, by folded JSON key."""

    fields: MappingProxyType[str, tuple[str, GoType]]
    pointer: bool = False   # a *T field: null sets it to nil

    @classmethod
    def of(cls, pointer: bool = False, **fields: GoType) -> GoStruct:
        return cls(MappingProxyType({name.upper(): (name, kind) for name, kind in fields.items()}), pointer)


@dataclass(frozen=True)
class GoSlice:
    element: GoType


# The scalar kinds: a Go string, a bool, and a *bool (null sets it to nil).
STRING, BOOL, OPTIONAL_BOOL = "string", "bool", "*bool"
GoType = Any   # STRING, BOOL, OPTIONAL_BOOL, GoStruct or GoSlice
_ZERO = MappingProxyType({STRING: "", BOOL: False})


@dataclass(frozen=True)
class SliceValue:
    """A decoded Go slice: its first length elements, and what its array still holds past them."""

    backing: tuple[Any, ...]
    length: int

    @property
    def items(self) -> tuple[Any, ...]:
        return self.backing[:self.length]


class GoDecodeError(ImagePolicyError):
    """A value encoding/json refuses to store, and where it is (JSON keys and indexes)."""

    def __init__(self, value: Any, kind: GoType) -> None:
        self.where: list[str] = []
        self.value = value
        self.expected = "true or false" if kind is BOOL or kind is OPTIONAL_BOOL else "a string" if kind is STRING \
            else f"a list of {'strings' if kind.element is STRING else 'objects'}" if isinstance(kind, GoSlice) \
            else "an object"
        super().__init__(f"{_shown(value)} where {self.expected} belongs")

    def place(self) -> str:
        """Where the value is, as '"tests"[0]."image"'."""
        return "".join(part if part.startswith("[") else ("." if index else "") + json.dumps(part)
                       for index, part in enumerate(self.where))


class GoAmbiguity(GoDecodeError):
    """An array that repeats shorter then longer: Go reuses what the longer one left
    only while the array has capacity, and how much it has depends on the Go version."""

    def __init__(self, value: Any, kind: GoType) -> None:
        super().__init__(value, kind)
        self.args = ("an array that repeats shorter then longer is ambiguous: what Go reads depends on"
                     " the Go version",)


def go_decode(value: Any, kind: GoType, current: Any) -> Any:
    """Decode a JSON value into a Go value of kind that already holds current.

    As encoding/json does: null leaves a string, bool or struct as it is and
    sets a pointer or slice to nil; an object is decoded into the struct
    already there (fields set before survive); an array is decoded element by
    element into the slice's existing elements. A wrong type is an error
    (dockerd answers 400; the Go plugin refused to start).
    """
    if value is None:
        pointer = kind is OPTIONAL_BOOL or isinstance(kind, GoSlice) or (isinstance(kind, GoStruct) and kind.pointer)
        return None if pointer else _ZERO.get(kind, current) if current is None and isinstance(kind, str) else current
    if kind is STRING:
        if not isinstance(value, str):
            raise GoDecodeError(value, kind)
        return value if value.isascii() else _LONE_SURROGATE_RE.sub("\ufffd", value)   # Go's \ud800: U+FFFD
    if kind is BOOL or kind is OPTIONAL_BOOL:
        if not isinstance(value, bool):
            raise GoDecodeError(value, kind)
        return value
    if isinstance(kind, GoStruct):
        if not isinstance(value, JSONObject):
            raise GoDecodeError(value, kind)
        fields = dict(current or {})
        for key, item in value:
            field = kind.fields.get(go_fold(key))
            if field:
                name, field_kind = field
                try:
                    fields[name] = go_decode(item, field_kind, fields.get(name))
                except GoDecodeError as error:
                    error.where.insert(0, name)
                    raise
        return fields
    if not isinstance(value, list) or isinstance(value, JSONObject):
        raise GoDecodeError(value, kind)
    if not value:
        return SliceValue((), 0)
    backing, length = (current.backing, current.length) if current else ((), 0)
    if len(value) > length and len(backing) > length:
        raise GoAmbiguity(value, kind)
    elements = list(backing)
    for index, item in enumerate(value):
        try:
            if index < length:
                elements[index] = go_decode(item, kind.element, elements[index])
            else:
                decoded = go_decode(item, kind.element, None)
                elements.append((_ZERO[kind.element] if isinstance(kind.element, str) else {})
                                if decoded is None else decoded)
        except GoDecodeError as error:
            error.where.insert(0, f"[{index}]")
            raise
    return SliceValue(tuple(elements), len(value))


def _go_replace(error: UnicodeError) -> tuple[str, int]:
    # Go decodes each byte of an invalid UTF-8 sequence as one U+FFFD.
    return "\ufffd", error.start + 1   # type: ignore[attr-defined]


codecs.register_error("docker-image-policy-go", _go_replace)
_JSON_DECODER = json.JSONDecoder(object_pairs_hook=JSONObject)
_LONE_SURROGATE_RE = re.compile("[\ud800-\udfff]")


def _plain(value: Any) -> Any:
    """A decoded JSON value with its objects as dicts again, to show it."""
    if isinstance(value, JSONObject):
        return {key: _plain(item) for key, item in value}
    return [_plain(item) for item in value] if isinstance(value, list) else value


def first_json_value(text: str) -> tuple[Any, str]:
    """The first JSON value in text, objects as JSONObject, and the text after it.

    As json.Decoder.Decode reads it (dockerd's request bodies, the Go
    plugin's file): what follows the value is not read. ValueError or
    RecursionError when there is no such value.
    """
    value, end = _JSON_DECODER.raw_decode(text, len(text) - len(text.lstrip(" \t\r\n")))
    return value, text[end:]


def _shown(value: Any) -> str:
    text = json.dumps(_plain(value))
    return text if len(text) <= 60 else text[:57] + "..."


# --------------------------------------------------------------------------
# Rules: RE2 syntax, read as Go's regexp/syntax reads it (parse.go, Perl flags)
# --------------------------------------------------------------------------

# The Go plugin matched each rule with regexp.MatchString: RE2 syntax with
# Go's Perl flags, a search anywhere in the text. Python's re reads much of
# that syntax differently ([[:alpha:]] is a set of ":ahlp" followed by "]",
# which makes a Go-era blacklist fail open), so every rule is parsed here as
# Go parses it, and what Go refuses is refused. The parsed rule becomes a
# Python pattern with the same meaning: every class spelled out character by
# character, no flag left for re to read its own way.
#
# Rules only ever see image references, which are ASCII. Character sets are
# exact over ASCII and the two other characters whose case folds into it
# (U+017F long s, U+212A Kelvin sign); OTHER stands for every other character.
OTHER = 128
LONG_S, KELVIN = 0x17F, 0x212A
ALPHABET = frozenset(range(128)) | {OTHER, LONG_S, KELVIN}
# Go's unicode.SimpleFold orbits that reach ASCII; no other orbit has a member in ALPHABET.
_FOLD_ORBITS = (*(frozenset({c, c + 32}) for c in range(ord("A"), ord("Z") + 1) if chr(c) not in "KS"),
                frozenset({ord("K"), ord("k"), KELVIN}), frozenset({ord("S"), ord("s"), LONG_S}))
FOLDS = MappingProxyType({c: orbit for orbit in _FOLD_ORBITS for c in orbit})


def _characters(text: str) -> frozenset[int]:
    return frozenset(map(ord, text))


def _between(low: str, high: str) -> frozenset[int]:
    return frozenset(range(ord(low), ord(high) + 1))


WORD_CHARACTERS = _between("0", "9") | _between("A", "Z") | _between("a", "z") | {ord("_")}
# perl_groups.go: RE2's \d \s \w are ASCII only, and its \s has no \v.
PERL_GROUPS = MappingProxyType({"d": _between("0", "9"), "s": _characters("\t\n\f\r "), "w": WORD_CHARACTERS})
# perl_groups.go's POSIX classes, ASCII only; [:^name:] is the negation.
POSIX_GROUPS = MappingProxyType({
    "alnum": _between("0", "9") | _between("A", "Z") | _between("a", "z"), "alpha": _between("A", "Z") | _between("a", "z"),
    "ascii": frozenset(range(128)), "blank": _characters("\t "), "cntrl": frozenset(range(32)) | {127},
    "digit": _between("0", "9"), "graph": _between("!", "~"), "lower": _between("a", "z"), "print": _between(" ", "~"),
    "punct": _between("!", "/") | _between(":", "@") | _between("[", "`") | _between("{", "~"),
    "space": _characters("\t\n\v\f\r "), "upper": _between("A", "Z"), "word": WORD_CHARACTERS,
    "xdigit": _between("0", "9") | _between("A", "F") | _between("a", "f")})
# The names \p{…} accepts: Go 1.19's unicode.Categories and unicode.Scripts.
UNICODE_CATEGORIES = frozenset("C Cc Cf Co Cs L Ll Lm Lo Lt Lu M Mc Me Mn N Nd Nl No P Pc Pd Pe Pf Pi Po Ps"
                               " S Sc Sk Sm So Z Zl Zp Zs".split())
UNICODE_SCRIPTS = frozenset("""Adlam Ahom Anatolian_Hieroglyphs Arabic Armenian Avestan Balinese Bamum Bassa_Vah
    Batak Bengali Bhaiksuki Bopomofo Brahmi Braille Buginese Buhid Canadian_Aboriginal Carian Caucasian_Albanian
    Chakma Cham Cherokee Chorasmian Common Coptic Cuneiform Cypriot Cyrillic Deseret Devanagari Dives_Akuru Dogra
    Duployan Egyptian_Hieroglyphs Elbasan Elymaic Ethiopic Georgian Glagolitic Gothic Grantha Greek Gujarati
    Gunjala_Gondi Gurmukhi Han Hangul Hanifi_Rohingya Hanunoo Hatran Hebrew Hiragana Imperial_Aramaic Inherited
    Inscriptional_Pahlavi Inscriptional_Parthian Javanese Kaithi Kannada Katakana Kayah_Li Kharoshthi
    Khitan_Small_Script Khmer Khojki Khudawadi Lao Latin Lepcha Limbu Linear_A Linear_B Lisu Lycian Lydian Mahajani
    Makasar Malayalam Mandaic Manichaean Marchen Masaram_Gondi Medefaidrin Meetei_Mayek Mende_Kikakui
    Meroitic_Cursive Meroitic_Hieroglyphs Miao Modi Mongolian Mro Multani Myanmar Nabataean Nandinagari New_Tai_Lue
    Newa Nko Nushu Nyiakeng_Puachue_Hmong Ogham Ol_Chiki Old_Hungarian Old_Italic Old_North_Arabian Old_Permic
    Old_Persian Old_Sogdian Old_South_Arabian Old_Turkic Oriya Osage Osmanya Pahawh_Hmong Palmyrene Pau_Cin_Hau
    Phags_Pa Phoenician Psalter_Pahlavi Rejang Runic Samaritan Saurashtra Sharada Shavian Siddham SignWriting
    Sinhala Sogdian Sora_Sompeng Soyombo Sundanese Syloti_Nagri Syriac Tagalog Tagbanwa Tai_Le Tai_Tham Tai_Viet
    Takri Tamil Tangut Telugu Thaana Thai Tibetan Tifinagh Tirhuta Ugaritic Vai Wancho Warang_Citi Yezidi Yi
    Zanabazar_Square""".split())
# Within ALPHABET, Latin has the letters (U+017F and U+212A too) and Common the rest of ASCII.
SCRIPT_MEMBERS = MappingProxyType({
    "Latin": _between("A", "Z") | _between("a", "z") | {LONG_S, KELVIN, OTHER},
    "Common": frozenset(range(128)) - _between("A", "Z") - _between("a", "z") | {OTHER}})
# parse.go's limits: a repeat count (and the product of nested ones), the
# nesting depth, and the size of the compiled program.
MAX_REPEAT_COUNT = 1000
MAX_NESTING = 1000
MAX_PROGRAM_SIZE = (128 << 20) // 40
# Python's re runs a rule in time polynomial in the length of a name. A rule
# whose degree (see backtracking_degree) is at most this takes time linear in
# it; any other rule is matched by a LinearMatcher, or refused if it needs
# Python's own syntax.
MAX_BACKTRACKING_DEGREE = 1
# A repetition of at most this many rounds of something that can match in
# several ways is as costly as that many copies of it, one after another.
MAX_SMALL_REPEAT = 3
# A LinearMatcher's program is as large as its rule, and each character of a
# name costs at most one visit of each state: the bound keeps one decision on
# the longest valid name at about what Go's regexp takes on such a rule, a
# fraction of a second (ordinary rules have tens of states; a larger one is
# refused at load). Its memory of
# steps is bounded, in steps and in the states they hold, so that crafted
# names cannot grow it without end (one name adds at most about 520 steps).
MAX_LINEAR_STATES = 2_500
MAX_CACHED_STEPS = 10_000
MAX_CACHED_STATES = 200_000
# Python's syntax that RE2 cannot parse and rules keep: look-arounds (as in the
# shipped policy's ^nginx:(?!latest$)) and back-references \1 to \9. Around and
# inside them the rule is still read as RE2.
LOOKAROUNDS = ("(?=", "(?!", "(?<=", "(?<!")


class RE2Error(ValueError):
    """A pattern Go's regexp/syntax refuses, in Go's words."""

    def __init__(self, code: str, expression: str) -> None:
        super().__init__(code, expression)
        self.code, self.expression = code, expression

    def __str__(self) -> str:
        return f"{self.code}: `{self.expression}`"


# A parsed rule is a tree of tuples, one kind per node:
#   ("chars", frozenset)                      one character of the set
#   ("concat", (node, …)), ("alternate", (node, …))
#   ("group", number or 0, node)              a capture (numbered as Python numbers them), or not
#   ("repeat", low, high or -1, node, counted) counted: written as {…}, which Go limits
#   ("assert", name)                          begin_text, end_text, begin_line, end_line, word, not_word
#   ("look", "=" "!" "<=" or "<!", node)      a look-around (Python's)
#   ("backref", number)                       a back-reference (Python's)


@dataclass
class _OpenGroup:
    """A group being parsed: its finished alternatives, its current one, the flags to restore at its end."""

    node: str      # "group" or "look"
    label: Any     # a capture's number (0: none), or a look-around's kind
    flags: frozenset[str]
    alternatives: list[tuple[Any, ...]]
    items: list[Any]


class RE2Parser:
    """parse.go's parse loop: builds the tree above, or raises RE2Error where Go refuses."""

    def __init__(self, pattern: str) -> None:
        self.pattern = pattern
        self.flags: frozenset[str] = frozenset()   # i, m, s; U (ungreedy) changes no search's result
        self.captures = 0
        self.extended = False   # uses a look-around or a back-reference

    def parse(self) -> Any:
        stack = [_OpenGroup("group", 0, self.flags, [], [])]
        text, last_repeat = self.pattern, ""
        while text:
            group, c, repeat = stack[-1], text[0], ""
            if c == "(":
                text = self._open(text, stack)
            elif c == "|":
                group.alternatives.append(tuple(group.items))
                group.items = []
                text = text[1:]
            elif c == ")":
                if len(stack) == 1:
                    raise RE2Error("unexpected )", self.pattern)
                stack.pop()
                self.flags = group.flags
                stack[-1].items.append((group.node, group.label, _alternation(group.alternatives + [tuple(group.items)])))
                text = text[1:]
            elif c in "^$":
                line = "m" in self.flags
                group.items.append(("assert", {"^": "begin", "$": "end"}[c] + ("_line" if line else "_text")))
                text = text[1:]
            elif c == ".":
                group.items.append(("chars", ALPHABET if "s" in self.flags else ALPHABET - {10}))
                text = text[1:]
            elif c == "[":
                chars, text = self._class(text)
                group.items.append(("chars", chars))
            elif c in "*+?":
                low, high = {"*": (0, -1), "+": (1, -1), "?": (0, 1)}[c]
                text, repeat = self._repeat(group, text, text[1:], low, high, False, last_repeat), text
            elif c == "{" and (counts := _repeat_counts(text)):
                low, high, after = counts
                if low < 0 or low > MAX_REPEAT_COUNT or high > MAX_REPEAT_COUNT or 0 <= high < low:
                    raise RE2Error("invalid repeat count", text[:len(text) - len(after)])
                text, repeat = self._repeat(group, text, after, low, high, True, last_repeat), text
            elif c == "\\":
                text = self._escape(text, group)
            else:
                group.items.append(self._literal(ord(c)))
                text = text[1:]
            last_repeat = repeat
        if len(stack) > 1:
            raise RE2Error("missing closing )", self.pattern)
        tree = _alternation(stack[0].alternatives + [tuple(stack[0].items)])
        # Neither limit can be reached by a short pattern without counted repetition.
        if len(self.pattern) > MAX_NESTING and _height(tree) > MAX_NESTING:
            raise RE2Error("expression nests too deeply", self.pattern)
        if "{" in self.pattern and _program_size(tree) > MAX_PROGRAM_SIZE:
            raise RE2Error("expression too large", self.pattern)
        return tree

    def _open(self, text: str, stack: list[_OpenGroup]) -> str:
        look = next((prefix for prefix in LOOKAROUNDS if text.startswith(prefix)), None)
        if look:
            self.extended = True
            stack.append(_OpenGroup("look", look[2:], self.flags, [], []))
            return text[len(look):]
        if not text.startswith("(?"):
            self.captures += 1
            stack.append(_OpenGroup("group", self.captures, self.flags, [], []))
            return text[1:]
        if len(text) > 4 and text[2:4] == "P<":
            end = text.find(">")
            if end < 0:
                raise RE2Error("invalid named capture", text)
            name = text[4:end]
            if not name or not all(c == "_" or c.isascii() and c.isalnum() for c in name):
                raise RE2Error("invalid named capture", text[:end + 1])
            self.captures += 1
            stack.append(_OpenGroup("group", self.captures, self.flags, [], []))
            return text[end + 1:]
        # Flags: (?i) for the rest of the group, (?i:…) for a group; i, m, s, U, and - to clear.
        added: set[str] = set()
        cleared: set[str] = set()
        rest, clearing, seen = text[2:], False, False
        while rest:
            c, rest = rest[0], rest[1:]
            if c in "imsU":
                (cleared if clearing else added).add(c)
                seen = True
            elif c == "-" and not clearing:
                clearing, seen = True, False
            elif c in ":)" and not (clearing and not seen):
                if c == ":":
                    stack.append(_OpenGroup("group", 0, self.flags, [], []))
                self.flags = frozenset((self.flags | added) - cleared)
                return rest
            else:
                break
        raise RE2Error("invalid or unsupported Perl syntax", text[:len(text) - len(rest)])

    def _repeat(self, group: _OpenGroup, before: str, after: str, low: int, high: int, counted: bool,
                last_repeat: str) -> str:
        after = after[1:] if after.startswith("?") else after   # non-greedy: the same names match
        if last_repeat:
            raise RE2Error("invalid nested repetition operator", last_repeat[:len(last_repeat) - len(after)])
        if not group.items:
            raise RE2Error("missing argument to repetition operator", before[:len(before) - len(after)])
        node = ("repeat", low, high, group.items[-1], counted)
        group.items[-1] = node
        if counted and (low >= 2 or high >= 2) and not _repeat_is_valid(node, MAX_REPEAT_COUNT):
            raise RE2Error("invalid repeat count", before[:len(before) - len(after)])
        return after

    def _escape(self, text: str, group: _OpenGroup) -> str:
        code = text[1:2]
        if code in ASSERTION_ESCAPES:
            group.items.append(("assert", ASSERTION_ESCAPES[code]))
            return text[2:]
        if code == "C":
            raise RE2Error("invalid escape sequence", text[:2])
        if code == "Q":
            literal, _, rest = text[2:].partition("\\E")
            group.items += [self._literal(ord(c)) for c in literal]
            return rest
        if code in ("p", "P"):
            chars, rest = self._unicode_class(text)
            group.items.append(("chars", chars))
            return rest
        if code and code in "dDsSwW":
            group.items.append(("chars", self._group(PERL_GROUPS[code.lower()], code.isupper())))
            return text[2:]
        if code in tuple("123456789") and text[2:3] not in tuple("01234567"):
            self.extended = True   # Go refuses \1 as an escape; Python reads a back-reference
            group.items.append(("backref", int(code)))
            return text[2:]
        character, rest = _escaped_character(text)
        group.items.append(self._literal(character))
        return rest

    def _literal(self, character: int) -> tuple[str, frozenset[int]]:
        chars = frozenset({character if character in ALPHABET else OTHER})
        return ("chars", _folded(chars) if "i" in self.flags else chars)

    def _group(self, chars: frozenset[int], negate: bool) -> frozenset[int]:
        """appendGroup: a Perl or POSIX class, folded first under (?i), then negated."""
        chars = _folded(chars) if "i" in self.flags else chars
        return _negated(chars) if negate else chars

    def _unicode_class(self, text: str) -> tuple[frozenset[int], str]:
        """\\pL, \\p{Greek}, \\PL, \\p{^Greek}: parseUnicodeClass."""
        negate = text[1] == "P"
        if text[2:3] == "{":
            end = text.find("}")
            if end < 0:
                raise RE2Error("invalid character class range", text)
            sequence, rest, name = text[:end + 1], text[end + 1:], text[3:end]
        else:
            sequence, rest, name = text[:3], text[3:], text[2:3]
        if name.startswith("^"):
            negate, name = not negate, name[1:]
        chars = _unicode_table(name)
        if chars is None:
            raise RE2Error("invalid character class range", sequence)
        return self._group(chars, negate), rest

    def _class(self, text: str) -> tuple[frozenset[int], str]:
        """[…]: parseClass, with POSIX, Perl and Unicode classes inside."""
        rest = text[1:]
        negate = rest.startswith("^")
        rest = rest[1:] if negate else rest
        chars: frozenset[int] = frozenset()
        first = True   # ] is a literal as the first character
        while not rest or rest[0] != "]" or first:
            first = False
            if len(rest) > 2 and rest.startswith("[:") and ":]" in rest[2:]:
                end = rest.index(":]", 2) + 2
                name = rest[:end]
                negative = name[2] == "^"
                members = POSIX_GROUPS.get(name[3:-2] if negative else name[2:-2])
                if members is None:
                    raise RE2Error("invalid character class range", name)
                chars |= self._group(members, negative)
                rest = rest[end:]
                continue
            if rest.startswith(("\\p", "\\P")):
                found, rest = self._unicode_class(rest)
                chars |= found
                continue
            if len(rest) >= 2 and rest[0] == "\\" and rest[1] in "dDsSwW":
                chars |= self._group(PERL_GROUPS[rest[1].lower()], rest[1].isupper())
                rest = rest[2:]
                continue
            start = rest
            low, rest = _class_character(rest, text)
            high = low
            if len(rest) >= 2 and rest[0] == "-" and rest[1] != "]":
                high, rest = _class_character(rest[1:], text)
                if high < low:
                    raise RE2Error("invalid character class range", start[:len(start) - len(rest)])
            found = frozenset(c for c in ALPHABET if low <= c <= high) | ({OTHER} if high >= 128 else set())
            chars |= _folded(found) if "i" in self.flags else found
        return (_negated(chars) if negate else chars), rest[1:]


ASSERTION_ESCAPES = MappingProxyType({"A": "begin_text", "z": "end_text", "b": "word", "B": "not_word"})
# parseEscape's single-letter escapes.
CONTROL_ESCAPES = MappingProxyType({"a": 7, "f": 12, "n": 10, "r": 13, "t": 9, "v": 11})
HEX_DIGITS = "0123456789abcdefABCDEF"


def _escaped_character(text: str) -> tuple[int, str]:
    """parseEscape: the character an escape such as \\x41, \\x{41}, \\101 or \\. stands for."""
    if len(text) < 2:
        raise RE2Error("trailing backslash at end of expression", "")
    c, rest = text[1], text[2:]
    if c in "01234567" and (c == "0" or rest[:1] and rest[0] in "01234567"):
        digits = c + "".join(itertools.takewhile(lambda d: d in "01234567", rest[:2]))
        return int(digits, 8), text[1 + len(digits):]
    if c == "x" and rest.startswith("{"):
        value, index = 0, 1
        while index < len(rest) and rest[index] in HEX_DIGITS and value <= sys.maxunicode:
            value, index = value * 16 + int(rest[index], 16), index + 1
        if value > sys.maxunicode:
            raise RE2Error("invalid escape sequence", text[:2 + index])
        if 1 < index < len(rest) and rest[index] == "}":
            return value, rest[index + 1:]
        raise RE2Error("invalid escape sequence", text[:3 + index])
    if c == "x":
        if len(rest) >= 2 and rest[0] in HEX_DIGITS and rest[1] in HEX_DIGITS:
            return int(rest[:2], 16), rest[2:]
        raise RE2Error("invalid escape sequence", text[:4])
    if c in CONTROL_ESCAPES:
        return CONTROL_ESCAPES[c], rest
    if c.isascii() and not c.isalnum():
        return ord(c), rest
    raise RE2Error("invalid escape sequence", text[:2])


def _class_character(text: str, whole_class: str) -> tuple[int, str]:
    if not text:
        raise RE2Error("missing closing ]", whole_class)
    return _escaped_character(text) if text[0] == "\\" else (ord(text[0]), text[1:])


def _repeat_counts(text: str) -> tuple[int, int, str] | None:
    """parseRepeat: {n}, {n,}, {n,m} as (low, high or -1, rest); None where { is a literal (x{,3})."""
    match = REPEAT_RE.match(text)
    if not match:
        return None
    low = _repeat_count(match["low"])
    high = low if match["comma"] is None else -1 if match["high"] is None else _repeat_count(match["high"])
    return (-1 if high == -2 else low), high, text[match.end():]


# A count is a number without leading zeros; Go reads counts of nine digits
# or more as too large (-1), refused as "invalid repeat count".
REPEAT_RE = re.compile(r"\{(?P<low>0|[1-9][0-9]*)(?:(?P<comma>,)(?P<high>0|[1-9][0-9]*)?)?\}")


def _repeat_count(digits: str) -> int:
    return int(digits) if len(digits) <= 8 else -2


def _repeat_is_valid(node: Any, limit: int) -> bool:
    """repeatIsValid: counted repetitions nested inside each other repeat at most limit copies in all."""
    if node[0] == "repeat" and node[4]:
        most = node[2] if node[2] >= 0 else node[1]
        if most == 0:
            return True
        if most > limit:
            return False
        limit //= max(most, 1)
    return all(_repeat_is_valid(child, limit) for child in _children(node))


def _children(node: Any) -> tuple[Any, ...]:
    kind = node[0]
    if kind in ("concat", "alternate"):
        return node[1]
    if kind in ("group", "look"):
        return (node[2],)
    if kind == "repeat":
        return (node[3],)
    return ()


def _height(node: Any) -> int:
    return 1 + max(map(_height, _children(node)), default=0)


def _program_size(node: Any) -> int:
    """calcSize: the size of the program Go compiles, which Go limits."""
    kind, sizes = node[0], [_program_size(child) for child in _children(node)]
    if kind == "group":
        return 2 + sizes[0] if node[1] else sizes[0]
    if kind == "repeat":
        low, high = node[1], node[2]
        if not node[4]:
            return (2 if low == 0 and high < 0 else 1) + sizes[0]
        if high < 0:
            return 2 + sizes[0] if low == 0 else 1 + low * sizes[0]
        return max(1, high * sizes[0] + high - low)
    return max(1, sum(sizes) + (len(sizes) - 1 if kind == "alternate" else 0))


def _flattened(node: Any) -> Any:
    """The tree with the items of groups and nested sequences moved into their sequence."""
    kind = node[0]
    if kind == "concat":
        items: list[Any] = []
        for item in map(_flattened, node[1]):
            items += item[1] if item[0] == "concat" else [item]
        return ("concat", tuple(items))
    if kind == "alternate":
        return ("alternate", tuple(map(_flattened, node[1])))
    if kind in ("group", "look"):
        inner = _flattened(node[2])
        return inner if kind == "group" else (kind, node[1], inner)
    if kind == "repeat":
        return ("repeat", node[1], node[2], _flattened(node[3]), node[4])
    return node


def _alternation(alternatives: list[tuple[Any, ...]]) -> Any:
    branches = [items[0] if len(items) == 1 else ("concat", items) for items in alternatives]
    return branches[0] if len(branches) == 1 else ("alternate", tuple(branches))


def _unicode_table(name: str) -> frozenset[int] | None:
    if name == "Any":
        return ALPHABET
    if name in UNICODE_CATEGORIES:
        return frozenset(c for c in ALPHABET - {OTHER} if unicodedata.category(chr(c)).startswith(name)) | {OTHER}
    if name in UNICODE_SCRIPTS:
        return SCRIPT_MEMBERS.get(name, frozenset({OTHER}))
    return None


def _folded(chars: frozenset[int]) -> frozenset[int]:
    return chars.union(*(FOLDS.get(c, ()) for c in chars))


def _negated(chars: frozenset[int]) -> frozenset[int]:
    return (ALPHABET - chars) | {OTHER}


# The tree as a Python pattern, compiled with re.ASCII: nothing in it is read
# by a flag, so re's own case folding, \d and $ never come into play. Under
# re.ASCII, \b and \B are RE2's, but for \B in an empty text, which RE2 matches.
PYTHON_ASSERTIONS = MappingProxyType({
    "begin_text": "^", "end_text": r"\Z", "begin_line": r"(?:^|(?<=\n))", "end_line": r"(?=\n|\Z)",
    "word": r"\b", "not_word": r"(?:\B|^\Z)"})
# RE2's . without (?s), which Python's . means too.
ANY_BUT_NEWLINE = ALPHABET - {10}
# Characters a pattern needs escaped; the others stand for themselves.
PYTHON_SPECIAL = frozenset(map(ord, ".^$*+?{}[]\\|()&~-"))


def python_pattern(node: Any) -> str:
    kind = node[0]
    if kind == "chars":
        return _python_set(node[1])
    if kind == "concat":
        return "".join(map(python_pattern, node[1]))
    if kind == "alternate":
        return "(?:" + "|".join(map(python_pattern, node[1])) + ")"
    if kind == "group":
        return ("(" if node[1] else "(?:") + python_pattern(node[2]) + ")"
    if kind == "repeat" and _fixed_length(node[3]) == 0 and not _captures(node[3]):
        return python_pattern(node[3]) if node[1] else ""   # an assertion holds once or every time
    if kind == "repeat":
        low, high = node[1], node[2]
        count = "*" if (low, high) == (0, -1) else "+" if (low, high) == (1, -1) else "?" if (low, high) == (0, 1) \
            else f"{{{low},}}" if high < 0 else f"{{{low}}}" if low == high else f"{{{low},{high}}}"
        return f"(?:{python_pattern(node[3])}){count}"
    if kind == "assert":
        return PYTHON_ASSERTIONS[node[1]]
    if kind == "look":
        return f"(?{node[1]}{python_pattern(node[2])})"
    return f"(?:\\{node[1]})"   # backref


def _captures(node: Any) -> bool:
    return node[0] == "group" and bool(node[1]) or any(map(_captures, _children(node)))


def _python_set(chars: frozenset[int]) -> str:
    if len(chars) == 1 and min(chars) < 128:
        return _python_character(min(chars))
    ascii_chars = sorted(c for c in chars if c < 128)
    if chars == ANY_BUT_NEWLINE:
        return "."
    if OTHER in chars and {LONG_S, KELVIN} <= chars:   # most characters: say which are not
        missing = sorted(set(range(128)) - chars)
        return "[^" + _python_ranges(missing) + "]" if missing else r"[\x00-\U0010ffff]"
    extra = [f"\\u{c:04x}" for c in (LONG_S, KELVIN) if c in chars] + ([r"\x80-\U0010ffff"] if OTHER in chars else [])
    body = _python_ranges(ascii_chars) + "".join(extra)
    return f"[{body}]" if body else "(?!)"


def _python_character(c: int) -> str:
    if c in PYTHON_SPECIAL:
        return "\\" + chr(c)
    return chr(c) if 32 < c < 127 else f"\\x{c:02x}"


def _python_ranges(codes: list[int]) -> str:
    parts = []
    for _, run in itertools.groupby(enumerate(codes), lambda pair: pair[1] - pair[0]):
        members = [c for _, c in run]
        parts.append(_python_character(members[0]) if len(members) == 1 else
                     _python_character(members[0]) + ("" if len(members) == 2 else "-") + _python_character(members[-1]))
    return "".join(parts)


# How long Python's re can take on a rule, as the degree of a polynomial in
# the length of the name. re tries the ways a text can be split among the
# pieces of a pattern one after another. A long repetition ([a-z]+, .*) reads
# up to the whole name: one factor of the length. One that can give back
# characters to what follows it (.* before :) retries the rest of the pattern
# at every length: one more factor, if the rest holds a long repetition too.
# A pattern not anchored with ^ is tried from every position: one more
# factor, if it holds a long repetition. A repetition of something that can
# itself match in several ways is exponential. The analysis errs towards a
# higher degree: a rule of degree over 1 is matched in linear time instead
# (or refused, when it needs Python's syntax).

def backtracking_degree(tree: Any) -> float:
    long = _unbounded(tree)
    return _degree(tree, frozenset()) + (1 if long else 0) + (1 if long and not _anchored(tree) else 0)


def _degree(node: Any, follow: frozenset[int], repeated: bool = False, long_after: bool = False) -> float:
    """follow: the characters that can come after node's match; repeated:
    whether node is inside a long repetition; long_after: whether a long
    repetition can come after it."""
    kind = node[0]
    if kind == "concat":
        total, after, long = 0.0, follow, long_after
        for item in reversed(node[1]):   # what comes after each item, from the end
            total += _degree(item, after, repeated, long)
            after, long = _first(item, after), long or _unbounded(item)
        return total
    if kind == "alternate":
        return max(_degree(branch, follow, repeated, long_after) for branch in node[1])
    if kind == "group":
        return _degree(node[2], follow, repeated, long_after)
    if kind == "look":   # tried again at every round of a long repetition around it
        body = node[2]
        return _degree(body, frozenset()) + (1 if repeated and _unbounded(body) else 0)
    if kind == "repeat":
        low, high, body = node[1], node[2], node[3]
        if high == 0:
            return 0
        long = not 0 <= high <= MAX_SMALL_REPEAT
        inner = _degree(body, _first(body, follow), repeated or long, long_after or _unbounded(body))
        gives_back = bool(_first(body) & follow)
        if _fixed_length(body) is not None and _deterministic(body):
            if low == high:
                return inner * low
            if long:
                return inner + (1 if inner else 0) + (1 if gives_back and long_after else 0)
            return inner + (1 if gives_back else 0)
        return inner * high if not long else math.inf
    return 0


def _first(node: Any, follow: frozenset[int] = frozenset()) -> frozenset[int]:
    """The characters a match of node can start with (follow, if it can be empty)."""
    kind = node[0]
    if kind == "chars":
        return node[1]
    if kind == "concat":
        found: frozenset[int] = frozenset()
        for item in node[1]:
            found |= _first(item)
            if not _nullable(item):
                return found
        return found | follow
    if kind == "alternate":
        return frozenset().union(*(_first(branch, follow) for branch in node[1]))
    if kind in ("group", "repeat"):
        body = _first(node[2] if kind == "group" else node[3], follow)
        return body | follow if _nullable(node) else body
    if kind == "backref":
        return ALPHABET | follow
    return follow   # assert, look


def _nullable(node: Any) -> bool:
    kind = node[0]
    if kind == "chars":
        return False
    if kind == "concat":
        return all(map(_nullable, node[1]))
    if kind == "alternate":
        return any(map(_nullable, node[1]))
    if kind == "group":
        return _nullable(node[2])
    if kind == "repeat":
        return node[1] == 0 or _nullable(node[3])
    return True


def _fixed_length(node: Any) -> int | None:
    kind = node[0]
    if kind == "chars":
        return 1
    if kind in ("concat", "alternate"):
        lengths = [_fixed_length(child) for child in node[1]]
        if None in lengths:
            return None
        if kind == "concat":
            return sum(lengths)   # type: ignore[arg-type]
        return lengths[0] if len(set(lengths)) == 1 else None
    if kind == "group":
        return _fixed_length(node[2])
    if kind == "repeat":
        body = _fixed_length(node[3])
        return None if body is None or node[1] != node[2] else body * node[1]
    return None if kind == "backref" else 0


def _deterministic(node: Any) -> bool:
    """Whether node's alternatives start with different characters, so a text can go one way only."""
    if node[0] == "alternate":
        firsts = [_first(branch) for branch in node[1]]
        if any(a & b for index, a in enumerate(firsts) for b in firsts[index + 1:]):
            return False
    return all(map(_deterministic, _children(node)))


def _unbounded(node: Any) -> bool:
    """Whether node holds a long repetition (or a back-reference, as long as what it refers to)."""
    return node[0] == "repeat" and not 0 <= node[2] <= MAX_SMALL_REPEAT or node[0] == "backref" \
        or any(map(_unbounded, _children(node)))


def _anchored(node: Any) -> bool:
    """Whether every match starts at the beginning of the text (^ or \\A first)."""
    kind = node[0]
    if kind == "assert":
        return node[1] == "begin_text"
    if kind == "concat":
        for item in node[1]:
            if _anchored(item):
                return True
            if _fixed_length(item) != 0:
                return False
        return False
    if kind == "alternate":
        return all(map(_anchored, node[1]))
    if kind == "group":
        return _anchored(node[2])
    return False


class LinearMatcher:
    """A rule matched in time linear in the text, as RE2 matches it: a
    Thompson simulation of the rule's automaton, whose steps are remembered
    (a lazily built DFA) so that a name already seen costs a lookup per
    character. Holds no look-around or back-reference."""

    def __init__(self, tree: Any) -> None:
        self.states: list[Any] = [("match",)]
        self.start = self._compile(tree, 0)
        self.steps: dict[tuple[frozenset[int], str, str], Any] = {}
        self.sets: dict[frozenset[int], frozenset[int]] = {}   # one object per set of states, shared by the steps
        self.stored = 0   # states held by self.sets

    def _new(self, state: Any) -> int:
        if len(self.states) >= MAX_LINEAR_STATES:
            raise RE2Error("expression too large to match in bounded time (write fewer or smaller counted"
                           " repetitions)", f"more than {MAX_LINEAR_STATES} states")
        self.states.append(state)
        return len(self.states) - 1

    def _compile(self, node: Any, following: int) -> int:
        """The state that matches node, then goes on to following."""
        kind = node[0]
        if kind == "chars":
            return self._new(("chars", node[1], following))
        if kind == "concat":
            for item in reversed(node[1]):
                following = self._compile(item, following)
            return following
        if kind == "alternate":
            return self._new(("split", tuple(self._compile(branch, following) for branch in node[1])))
        if kind == "group":
            return self._compile(node[2], following)
        if kind == "assert":
            return self._new(("assert", node[1], following))
        if kind != "repeat":
            raise RE2Error("Python syntax cannot be matched in linear time", "")
        low, high, body = node[1], node[2], node[3]
        if high < 0:
            loop = self._new(None)
            self.states[loop] = ("split", (self._compile(body, loop), following))
            tail = loop
        else:
            tail = following
            for _ in range(high - low):
                tail = self._new(("split", (self._compile(body, tail), following)))
        for _ in range(low):
            tail = self._compile(body, tail)
        return tail

    def search(self, text: str) -> bool:
        """regexp.MatchString: whether the rule matches anywhere in text."""
        steps = self.steps
        if len(steps) > MAX_CACHED_STEPS or self.stored > MAX_CACHED_STATES:
            self.steps, self.sets, self.stored = {}, {}, 0
            steps = self.steps
        current = frozenset({self.start})
        previous = ""
        for character in text:
            step = steps.get((current, previous, character))
            if step is None:
                step = self._step(steps, current, previous, character)
            if step is True:
                return True
            current, previous = step, character
        step = steps.get((current, previous, ""))
        return (self._step(steps, current, previous, "") if step is None else step) is True

    def _step(self, steps: dict[Any, Any], current: frozenset[int], previous: str, character: str) -> Any:
        """From the states before character: True if one reaches a match, else the states after it."""
        reached: set[int] = set()
        pending = list(current)
        while pending:
            index = pending.pop()
            if index in reached:
                continue
            reached.add(index)
            state = self.states[index]
            if state[0] == "split":
                pending += state[1]
            elif state[0] == "assert" and _holds(state[1], previous, character):
                pending.append(state[2])
        if 0 in reached:
            step: Any = True
        else:
            code = ord(character) if character else -1
            code = code if code < 128 or code in (LONG_S, KELVIN) else OTHER
            step = frozenset({self.start} | {self.states[index][2] for index in reached
                                             if self.states[index][0] == "chars" and code in self.states[index][1]})
            if step not in self.sets:
                self.sets[step] = step
                self.stored += len(step)
            step = self.sets[step]
        steps[(current, previous, character)] = step
        return step


def _holds(assertion: str, previous: str, following: str) -> bool:
    """Whether an empty-width assertion holds between two characters ("" at either end)."""
    if assertion in ("word", "not_word"):
        boundary = (previous != "" and ord(previous) in WORD_CHARACTERS) != \
            (following != "" and ord(following) in WORD_CHARACTERS)
        return boundary == (assertion == "word")
    return {"begin_text": previous == "", "end_text": following == "",
            "begin_line": previous in ("", "\n"), "end_line": following in ("", "\n")}[assertion]


# --------------------------------------------------------------------------
# Policy: rules and verdicts
# --------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class Rule:
    """One regular expression of the whitelist or the blacklist."""

    kind: str
    index: int
    pattern: str         # as written, in RE2 syntax (with Python's look-arounds and back-references)
    regex: re.Pattern[str]   # the same meaning in Python's syntax
    search: Callable[[str], Any]   # regex.search, or a LinearMatcher's where re could take long
    prefix: str | None   # literal text every match starts with; None when unanchored
    only_prefix: bool    # the pattern is exactly ^prefix: it matches what starts with it
    canonical: bool      # matched against canonical forms too: a blacklist rule, or one that names docker.io
    label: str = dataclasses.field(init=False, repr=False)       # whitelist[0] "^nginx:", as verdicts name it
    verdict: Verdict = dataclasses.field(init=False, repr=False)   # what the rule says of a name it matches

    def __post_init__(self) -> None:
        # Made once, at load: every decision a rule takes names it the same way.
        written = json.dumps(self.pattern)
        object.__setattr__(self, "label", f"{self.kind}[{self.index}] {written}")
        object.__setattr__(self, "verdict", Verdict(self.kind == "whitelist", self.label,
                                                    f"{self.kind} rule {written} matches", self))

    def __str__(self) -> str:
        return self.label


# Suffixes that make probe strings out of a prefix (see trusted_prefix).
_PROBE_SUFFIXES = ("", "a", "0", ":1", "/a:1", ".a/b", "@sha256:" + "0" * 64, "\n")


def literal_prefix(regex: re.Pattern[str], search: Callable[[str], Any] | None = None) -> tuple[str | None, bool]:
    """The literal text that starts every match of an anchored pattern, and
    whether the pattern is nothing but that text (None: no such text)."""
    prefix, only = _parsed_prefix(regex)
    return trusted_prefix(regex, prefix, only, search)


def trusted_prefix(regex: re.Pattern[str], prefix: str | None, only: bool,
                   search: Callable[[str], Any] | None = None) -> tuple[str | None, bool]:
    """The prefix, if the regex agrees with it on probe strings; else None.

    The index skips a rule for every name that does not start with its
    prefix: a prefix computed wrongly would skip a blacklist rule where it
    matches. In doubt, the rule is tried on every request instead.
    """
    if prefix is None:
        return None, False
    search = search or regex.search
    text = re.sub(r"\\(.)", r"\1", regex.pattern.lstrip("^"))   # the pattern read as plain text
    bases = {"", prefix[:len(prefix) // 2], prefix[:-1], "x" + prefix, text, text[:len(prefix)]}
    for probe in (base + suffix for base in bases for suffix in _PROBE_SUFFIXES):
        if not probe.startswith(prefix) and search(probe):
            return None, False
    return prefix, only and all(search(prefix + suffix) for suffix in _PROBE_SUFFIXES)


def _parsed_prefix(regex: re.Pattern[str]) -> tuple[str | None, bool]:
    if regex_parser is None:
        return None, False
    parsed = regex_parser.parse(regex.pattern, regex.flags)
    items = list(parsed)
    if parsed.state.flags & (re.IGNORECASE | re.MULTILINE) or not items:
        return None, False
    if items[0] not in ((regex_parser.AT, regex_parser.AT_BEGINNING),
                        (regex_parser.AT, regex_parser.AT_BEGINNING_STRING)):
        return None, False
    prefix: list[str] = []
    for op, value in items[1:]:
        if op is not regex_parser.LITERAL:
            return "".join(prefix), False
        prefix.append(chr(value))
    return "".join(prefix), True


_rule_index = operator.attrgetter("index")


@dataclass(frozen=True)
class RuleSet:
    """Rules indexed by literal prefix, so a lookup is flat in their number.

    first_match() returns exactly what a loop over the rules in order would:
    a rule whose prefix does not start the text cannot match it, and the
    rules that remain are tried in order.
    """

    rules: tuple[Rule, ...]
    by_prefix: MappingProxyType[str, tuple[Rule, ...]]
    prefix_lengths: tuple[int, ...]
    unanchored: tuple[Rule, ...]

    def candidates(self, texts: tuple[str, ...]) -> tuple[Rule, ...] | list[Rule]:
        """The rules that can match one of texts, in file order."""
        found: list[Rule] = []
        for text in texts:
            for length in self.prefix_lengths:
                if length > len(text):
                    break
                found += self.by_prefix.get(text[:length], ())
        if not found:
            return self.unanchored   # already in order
        if len(found) > 1 or self.unanchored:
            return sorted(set(found).union(self.unanchored), key=_rule_index)
        return found

    def first_match(self, reference: Reference) -> Rule | None:
        """The first rule matching a familiar form, or a canonical one if the rule names docker.io."""
        familiar, texts = reference.familiar_forms, reference.all_forms
        for rule in self.candidates(texts):
            search = rule.search
            for text in texts if rule.canonical else familiar:
                if search(text):
                    return rule
        return None


def build_rule_set(rules: list[Rule]) -> RuleSet:
    by_prefix: dict[str, list[Rule]] = {}
    for rule in rules:
        if rule.prefix is not None:
            by_prefix.setdefault(rule.prefix, []).append(rule)
    return RuleSet(
        rules=tuple(rules),
        by_prefix=MappingProxyType({k: tuple(v) for k, v in by_prefix.items()}),
        prefix_lengths=tuple(sorted({len(k) for k in by_prefix})),
        unanchored=tuple(rule for rule in rules if rule.prefix is None),
    )


@dataclass(frozen=True)
class Verdict:
    """What the rules say about one reference."""

    allow: bool
    rule: str     # the label of what decided: whitelist[0] "^nginx:", scopes[3], defaultAllow
    reason: str
    decided_by: Rule | ScopeEntry | None = dataclasses.field(default=None, compare=False, repr=False)


DEFAULT_ALLOWED = Verdict(True, "defaultAllow", "no rule matches and defaultAllow is true")
DEFAULT_DENIED = Verdict(False, "defaultAllow", "no whitelist rule matches and defaultAllow is false")
NAMELESS = Verdict(False, "nameless", "moby-dangling is the containerd image store's placeholder for an image that"
                   " lost its last name, and a nameless image has no name the policy could allow")


# --------------------------------------------------------------------------
# Policy: scopes (registries, namespaces and repositories by whole components)
# --------------------------------------------------------------------------

@dataclass(frozen=True)
class Caller:
    """Who makes a request: the subject of the TLS client certificate dockerd
    forwards (with --tlsverify), or nobody (the unix socket, ssh://)."""

    identified: bool
    cn: str = ""
    o: tuple[str, ...] = ()
    ou: tuple[str, ...] = ()
    # A certificate the plugin cannot read: no allow entry's callers hold for it, every deny entry's do.
    unreadable: bool = False

    def __str__(self) -> str:
        if not self.identified:
            return "unidentified"
        if self.unreadable:
            return "an unreadable client certificate"
        parts = ([f"cn:{self.cn}"] if self.cn else []) + [f"o:{o}" for o in self.o] + [f"ou:{ou}" for ou in self.ou]
        return " ".join(parts) or "a certificate without CN, O or OU"

    def document(self) -> dict[str, Any]:
        """The caller in the decision log, as --replay reads it back."""
        return {"cn": self.cn, "o": list(self.o), "ou": list(self.ou), "unreadable": self.unreadable}


UNIDENTIFIED = Caller(False)


def logged_caller(document: Any) -> Caller:
    """The caller of a decision-log line (Caller.document); unidentified when the line names none."""
    if document is None:
        return UNIDENTIFIED
    return Caller(True, str(document.get("cn", "")), tuple(document.get("o", ())), tuple(document.get("ou", ())),
                  bool(document.get("unreadable")))
CALLER_SELECTOR_RE = re.compile(r"(?P<kind>cn|o|ou):(?P<value>.+)|unidentified", re.S)


def caller_of_selectors(selectors: Iterable[str]) -> Caller:
    """The caller that --check --caller and a policy test's "caller" describe: cn:alice ou:team-a, or unidentified."""
    fields: dict[str, Any] = {"cn": "", "o": (), "ou": ()}
    selectors = list(selectors)
    for selector in selectors:
        match = CALLER_SELECTOR_RE.fullmatch(selector)
        if not match or (selector == "unidentified" and len(selectors) > 1):
            raise ValueError(f"a caller is cn:NAME, o:NAME, ou:NAME (several together) or unidentified,"
                             f" not {selector!r}")
        if match["kind"] == "cn":
            fields["cn"] = match["value"]
        elif match["kind"]:
            fields[match["kind"]] += (match["value"],)
    return Caller(True, **fields) if selectors and selectors != ["unidentified"] else UNIDENTIFIED


def glob_match(pattern: str, text: str) -> bool:
    """Whether text matches a glob of * and ? whole, in time len(pattern) * len(text) at most (no backtracking
    regular expression: a common name may be long)."""
    p = t = 0
    star, resume = -1, 0
    while t < len(text):
        if p < len(pattern) and pattern[p] in ("?", text[t]) and pattern[p] != "*":
            p, t = p + 1, t + 1
        elif p < len(pattern) and pattern[p] == "*":
            star, resume, p = p, t, p + 1
        elif star >= 0:
            p, resume = star + 1, resume + 1
            t = resume
        else:
            return False
    return all(c == "*" for c in pattern[p:])


@dataclass(frozen=True)
class ScopeEntry:
    """One entry of "scopes": allow or deny a scope, on conditions."""

    index: int
    allow: bool
    scope: str
    tags: tuple[str, ...] = ()
    digest_only: bool = False
    callers: tuple[str, ...] = ()
    until: float | None = None   # a POSIX time: past it the entry is as if absent
    until_text: str = ""
    ticket: str = ""
    note: str = ""
    signed_by: tuple[str, ...] = ()        # the key files, as the entry names them
    keys: tuple[PublicKey, ...] = ()       # loaded from them at policy load
    label: str = dataclasses.field(init=False, repr=False)       # scopes[3], as verdicts name it
    verdict: Verdict = dataclasses.field(init=False, repr=False)   # what the entry says when its conditions hold

    def __post_init__(self) -> None:
        # Made once, at load, as a rule's verdict is.
        object.__setattr__(self, "label", f"scopes[{self.index}]")
        object.__setattr__(self, "verdict", Verdict(self.allow, self.label, f"{self}{self.explanation()} matches",
                                                    self))

    def __str__(self) -> str:
        return f"scopes[{self.index}] {'allow' if self.allow else 'deny'} {json.dumps(self.scope)}"

    def active(self, now: float) -> bool:
        return self.until is None or now < self.until

    def failed_condition(self, reference: Reference, caller: Caller) -> str | None:
        """None when the entry's conditions hold for reference and caller, else the first that does not."""
        if self.digest_only and not reference.digest:
            return "references by digest only"
        if self.tags:
            tag = None if reference.digest else reference.tag or "latest"   # dockerd ignores a tag beside a digest
            if tag is None or not any(glob_match(pattern, tag) for pattern in self.tags):
                return f"tags {', '.join(self.tags)}" + ("" if tag else " (a digest has no tag)")
        if self.callers and not self.caller_holds(caller):
            return f"callers {', '.join(self.callers)}"
        return None

    def caller_holds(self, caller: Caller) -> bool:
        if caller.unreadable:
            return not self.allow   # fail closed: a deny holds, an allow does not
        for selector in self.callers:
            kind, _, value = selector.partition(":")
            if (selector == "unidentified" and not caller.identified
                    or kind == "cn" and caller.identified and glob_match(value, caller.cn)
                    or kind == "o" and value in caller.o or kind == "ou" and value in caller.ou):
                return True
        return False

    def explanation(self) -> str:
        """What the decision log says about the entry: its conditions, its end, its ticket and note."""
        parts = [f"tags {', '.join(self.tags)}"] if self.tags else []
        parts += ["by digest only"] if self.digest_only else []
        parts += [f"for callers {', '.join(self.callers)}"] if self.callers else []
        parts += [f"signed by {', '.join(self.signed_by)}"] if self.signed_by else []
        parts += [f"until {self.until_text}"] if self.until_text else []
        parts += [f"ticket {self.ticket}"] if self.ticket else []
        parts += [f"note: {self.note}"] if self.note else []
        return f" ({'; '.join(parts)})" if parts else ""


@dataclass(frozen=True)
class SignatureVerdict:
    """Whether a listed key signed an image's digest; if not, which check failed."""

    ok: bool
    reason: str


class Signatures:
    """How a policy learns whether a listed key signed an image, as it learns its caller and time.

    The daemon asks the registry: for a pull, about the digest pulled (or the
    tag's digest now); for an image present, about the digest it was pulled
    by (see RegistrySignatures). Where no registry can be asked, a fixed
    verdict stands (OfflineSignatures).
    """

    # Whether a run of a name is judged by the image present under it (of_image), not by the name alone.
    judges_images = True

    def check(self, reference: Reference, keys: tuple[PublicKey, ...]) -> SignatureVerdict:
        """Whether one of keys signed what reference names."""
        raise NotImplementedError

    def of_image(self, local: LocalImage) -> Signatures:
        """The signatures of an image present on the host, whatever name it is judged by."""
        return self


@dataclass(frozen=True)
class OfflineSignatures(Signatures):
    """One verdict for every image: a policy test's "signed", or a refusal where no registry is asked."""

    verdict: SignatureVerdict
    judges_images = False

    def check(self, reference: Reference, keys: tuple[PublicKey, ...]) -> SignatureVerdict:
        return self.verdict


NO_SIGNATURES = OfflineSignatures(SignatureVerdict(False, "no signature can be verified here (policy tests and"
                                                          " --replay ask no registry; a policy test may say"
                                                          " \"signed\": true or false)"))


# A signature covers one digest: no signedBy entry allows a pull of every tag.
EVERY_TAG = OfflineSignatures(SignatureVerdict(False, "a signature covers one digest and a pull of all tags fetches"
                                                      " many; pull a tag or digest"))


@functools.lru_cache(maxsize=4096)
def scope_keys(domain: str, path: str) -> tuple[str, ...]:
    """The scopes that could govern a repository, most specific first: the exact
    host with each shorter path, then each wildcard domain above the host, with
    the port before without it."""
    components = path.split("/")
    keys = [domain + "".join("/" + c for c in components[:length]) for length in range(len(components), -1, -1)]
    host, colon, port = domain.partition(":")
    labels = host.split(".")
    for start in range(1, len(labels)):
        suffix = "*." + ".".join(labels[start:])
        for wildcard in ([f"{suffix}:{port}", suffix] if colon else [suffix]):
            keys += [wildcard + "".join("/" + c for c in components[:length])
                     for length in range(len(components), -1, -1)]
    return tuple(keys)


@dataclass(frozen=True)
class ScopeTable:
    """Scope entries by scope: a lookup is a few dictionary probes, flat in their number."""

    entries: tuple[ScopeEntry, ...]
    by_scope: MappingProxyType[str, tuple[ScopeEntry, ...]]
    uses_callers: bool
    ends: tuple[float, ...]   # every until, in order: answers are remembered until the next one
    signed: bool = False      # some entry has signedBy: decisions may need the registry

    def governing(self, reference: Reference, now: float) -> tuple[str, list[ScopeEntry]] | None:
        """The most specific scope with an active entry for reference, and those entries."""
        if not self.by_scope:
            return None
        for key in scope_keys(reference.domain, reference.path):
            entries = [entry for entry in self.by_scope.get(key, ()) if entry.active(now)]
            if entries:
                return key, entries
        return None

    def needs_signature(self, reference: Reference, now: float) -> bool:
        """Whether the scope governing reference has an entry with signedBy."""
        governing = self.signed and self.governing(reference, now)
        return bool(governing) and any(entry.keys for entry in governing[1])   # type: ignore[index]

    def evaluate(self, reference: Reference, caller: Caller, now: float,
                 signatures: Signatures = NO_SIGNATURES) -> Verdict | None:
        """The verdict of the scope governing reference; None when no scope governs it.

        Another spelling of the same registry (registry-1.docker.io, :443,
        :0443) is judged under its usual name too, and whatever denies the
        usual name denies it: a deny entry, or a scope that governs the usual
        name and allows it on conditions that do not hold. An allow there
        does not admit the other spelling, which needs an allow of its own.
        """
        return _as_usual_name(reference, lambda spelling: self._evaluate(spelling, caller, now, signatures))

    def _evaluate(self, reference: Reference, caller: Caller, now: float, signatures: Signatures) -> Verdict | None:
        governing = self.governing(reference, now)
        if governing is None:
            return None
        scope, entries = governing
        for entry in entries:
            if not entry.allow and entry.failed_condition(reference, caller) is None:
                return entry.verdict
        misses = []
        for entry in entries:   # those without signedBy first (build_scope_table)
            if not entry.allow:
                continue
            failed = entry.failed_condition(reference, caller)
            if failed is not None:
                misses.append(f"scopes[{entry.index}] is for {failed}")
                continue
            if not entry.keys:
                return entry.verdict
            signed = signatures.check(reference, entry.keys)
            if signed.ok:
                return Verdict(True, entry.label, f"{entry.verdict.reason}: {signed.reason}", entry)
            misses.append(f"scopes[{entry.index}] needs a signature by {', '.join(entry.signed_by)}: {signed.reason}")
        who = f"; the caller is {cut(str(caller))}" if self.uses_callers else ""
        why = f" ({'; '.join(misses)}{who})" if misses else ""
        return Verdict(False, f"scope {scope}", f"scope {json.dumps(scope)} governs it and no entry there allows it{why}")

    def evaluate_all_tags(self, reference: Reference, caller: Caller, now: float) -> Verdict | None:
        """A pull of every tag: allowed by an allow entry with no tag or digest condition, unless a deny may hold."""
        return _as_usual_name(reference, lambda spelling: self._evaluate_all_tags(spelling, caller, now))

    def _evaluate_all_tags(self, reference: Reference, caller: Caller, now: float) -> Verdict | None:
        verdict = self._evaluate(dataclasses.replace(reference, tag="latest"), caller, now, EVERY_TAG)
        if verdict is None or not verdict.allow:
            return verdict
        governing = self.governing(reference, now)
        entries = governing[1] if governing else []
        for entry in entries:
            untagged = dataclasses.replace(entry, tags=())
            if not entry.allow and untagged.failed_condition(reference, caller) is None:
                return Verdict(False, entry.label, f"a pull of all tags includes tags {entry} denies", entry)
        for entry in entries:
            if entry.allow and not entry.tags and not entry.digest_only and not entry.keys \
                    and entry.failed_condition(reference, caller) is None:
                return Verdict(True, entry.label, f"{entry.verdict.reason} every tag", entry)
        return Verdict(False, "all-tags", "a pull of all tags is allowed only by a scope entry without tags,"
                       " digestOnly or signedBy; pull a tag or digest instead")

    def next_end(self, now: float) -> float:
        """When the next entry ends (inf if none does): no remembered answer outlives it."""
        index = bisect.bisect_right(self.ends, now)
        return self.ends[index] if index < len(self.ends) else float("inf")


def _as_usual_name(reference: Reference, verdict_of: Callable[[Reference], Verdict | None]) -> Verdict | None:
    """verdict_of(reference), unless verdict_of denies the same repository under its usual name."""
    if reference.alias:
        usual = verdict_of(reference.alias)
        if usual is not None and not usual.allow:
            return Verdict(False, usual.rule, f"{usual.reason}, for {reference.alias.familiar}, the same repository"
                           " under its usual name", usual.decided_by)
    return verdict_of(reference)


NO_SCOPES = ScopeTable((), MappingProxyType({}), False, ())
# host[:port] or *.domain[:port], then path components, as distribution/reference spells them.
SCOPE_RE = re.compile(rf"""
    (?P<host>(?:\*\.)?{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*(?::[0-9]+)?)
    (?P<path>(?:/{_PATH_COMPONENT})*)
""", re.VERBOSE)
SCOPE_ENTRY_KEYS = ("allow", "deny", "tags", "digestOnly", "callers", "until", "signedBy", "ticket", "note")
# A date is the end of that day in UTC; a time says its zone.
_DATE_RE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")


def compile_scope_entry(path: str, index: int, entry: dict[str, Any]) -> ScopeEntry:
    where = f'"scopes"[{index}]'
    allow, deny = entry.get("allow", ""), entry.get("deny", "")
    if bool(allow) == bool(deny):
        raise ConfigError(path, where, 'needs exactly one of "allow" and "deny", the scope it allows or denies')
    scope = allow or deny
    match = SCOPE_RE.fullmatch(scope)
    if not match or scope.lower() != scope:
        raise ConfigError(path, where, f"{json.dumps(scope)} is not a scope: host[:port], host[:port]/namespace…"
                                       " or *.domain, in lower case, as in registry.example.com:5000/team")
    host = match["host"]
    if "." not in host and ":" not in host and host != "localhost":
        raise ConfigError(path, where, f"{json.dumps(scope)} does not start with a registry host: write the whole"
                                       f" name, e.g. docker.io/library/{host} or docker.io/{scope}")
    if host.removeprefix("*.").split(":")[0] in HUB_ALIASES - {"docker.io"}:
        raise ConfigError(path, where, f"{json.dumps(scope)}: write Docker Hub as docker.io")
    tags = entry["tags"].items if entry.get("tags") else ()
    for tag in tags:
        if not re.fullmatch(r"[0-9A-Za-z_.*?-]{1,128}", tag):
            raise ConfigError(path, where, f"tag pattern {json.dumps(tag)} can match no tag: tags are letters,"
                                           " digits, _ . and -, with * and ? as wildcards")
    callers = entry["callers"].items if entry.get("callers") else ()
    for selector in callers:
        if not CALLER_SELECTOR_RE.fullmatch(selector):
            raise ConfigError(path, where, f'caller {json.dumps(selector)} is not cn:NAME (a glob), o:NAME,'
                                           ' ou:NAME or unidentified')
    until_text = entry.get("until", "")
    until = parse_time(until_text, end_of_day=True) if until_text else None
    if until_text and until is None:
        raise ConfigError(path, where, f'"until" must be a date (2027-01-31, the end of that day in UTC) or an'
                                       f" RFC 3339 time with its zone, not {json.dumps(until_text)}")
    signed_by = entry["signedBy"].items if entry.get("signedBy") is not None else ()
    if entry.get("signedBy") is not None and (deny or not signed_by):
        raise ConfigError(path, where, '"signedBy" is a condition of allow entries: it lists the PEM public keys'
                                       " whose signature an image needs" if deny else '"signedBy" lists no key')
    try:   # a relative key file is beside the policy file
        keys = load_public_keys([os.path.join(os.path.dirname(path), key) for key in signed_by])
    except ConfigError as error:
        raise ConfigError(path, where, f"signedBy {json.dumps(error.path)}: {error.problem}") from None
    return ScopeEntry(index, bool(allow), scope, tags, bool(entry.get("digestOnly")), callers, until, until_text,
                      entry.get("ticket", ""), entry.get("note", ""),
                      signed_by, keys)


def entry_document(entry: ScopeEntry) -> dict[str, Any]:
    """An entry as the file spells it, for /config."""
    written = {"allow" if entry.allow else "deny": entry.scope, "tags": list(entry.tags),
               "digestOnly": entry.digest_only, "callers": list(entry.callers), "until": entry.until_text,
               "signedBy": list(entry.signed_by), "ticket": entry.ticket, "note": entry.note}
    return {key: value for key, value in written.items() if value}


def parse_time(text: str, end_of_day: bool = False) -> float | None:
    """A POSIX time from a date (its start in UTC, or its end for "until") or an RFC 3339 time with its zone."""
    try:
        if _DATE_RE.fullmatch(text):
            day = datetime.date.fromisoformat(text)
            start = datetime.datetime(day.year, day.month, day.day, tzinfo=datetime.timezone.utc).timestamp()
            return start + 86400 if end_of_day else start
        moment = datetime.datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        return None
    return moment.timestamp() if moment.tzinfo else None


def build_scope_table(entries: list[ScopeEntry]) -> ScopeTable:
    by_scope: dict[str, list[ScopeEntry]] = {}
    # Entries without signedBy first: a signature is looked up only when no other entry allows.
    for entry in sorted(entries, key=lambda entry: bool(entry.keys)):
        by_scope.setdefault(entry.scope, []).append(entry)
    return ScopeTable(tuple(entries), MappingProxyType({k: tuple(v) for k, v in by_scope.items()}),
                      any(entry.callers for entry in entries),
                      tuple(sorted(entry.until for entry in entries if entry.until is not None)),
                      any(entry.keys for entry in entries))


# A rule that names Docker Hub's domain is about canonical names
# (docker.io/library/nginx:1.25); any other rule is about the familiar names
# the original plugin matched (nginx:1.25), so ^docker means docker:24 and
# docker/compose:2, not every canonical name that starts with docker.io/.
# However the rule spells it: docker\.io, DOCKER.IO, docker[.]io, docker\x2eio, \Qdocker.io\E.
HUB_DOMAIN = "docker.io"


def names_docker_hub(tree: Any) -> bool:
    """Whether a parsed rule has docker.io in it: nine characters in a row, each of a set holding
    that character of docker.io, the letters in either case and nothing else."""
    if tree[0] == "concat":
        sets = [item[1] if item[0] == "chars" else None for item in tree[1]]
        for start in range(len(sets) - len(HUB_DOMAIN) + 1):
            if sets[start] and sets[start] & FOLDS[ord("d")] and all(chars is not None and (ord(c) in chars if c == "." else chars & FOLDS[ord(c)] == chars != set())
                   for c, chars in zip(HUB_DOMAIN, sets[start:])):
                return True
    return any(map(names_docker_hub, _children(tree)))


@dataclass(frozen=True)
class Policy:
    """The compiled configuration: typed, immutable; a reload builds a new one."""

    path: str
    whitelist: RuleSet
    blacklist: RuleSet
    default_allow: bool
    mode: str
    check_run: bool
    message: str
    operations: MappingProxyType[Operation, Verdict]   # every opaque operation's verdict, resolved at load
    sha256: str = ""     # of the file's contents: logs and metrics say which policy decided
    tests: tuple[PolicyTest, ...] = ()             # the file's own expectations: see policy_test_failures
    scopes: ScopeTable = NO_SCOPES
    caller: Caller = UNIDENTIFIED                  # who asks: see asked_by
    at: float | None = None                        # judge at this time, not now (--check --at, tests, --replay)
    signatures: Signatures = NO_SIGNATURES         # how signedBy is checked: see judged_with
    keys: frozenset[str] = frozenset()             # the settings the file gives, by their names in CONFIG_DEFAULTS
    notes: tuple[str, ...] = ()                    # what reading the file as Go does may surprise its author with

    @property
    def audit(self) -> bool:
        return self.mode == "audit"

    def summary(self) -> str:
        scopes = f", {len(self.scopes.entries)} scope entries" if self.scopes.entries else ""
        return (f"{len(self.whitelist.rules)} whitelist and {len(self.blacklist.rules)} blacklist rules{scopes},"
                f" mode {self.mode}")

    def asked_by(self, caller: Caller) -> Policy:
        """The policy as it judges one caller's requests (the same policy when no entry names callers)."""
        return dataclasses.replace(self, caller=caller) if self.scopes.uses_callers else self

    def judged_with(self, signatures: Signatures) -> Policy:
        """The policy as it checks signatures with signatures (the same policy when no entry has signedBy)."""
        return dataclasses.replace(self, signatures=signatures) if self.scopes.signed else self

    def of_image(self, local: LocalImage) -> Policy:
        """The policy as it judges the names of an image present on the host: by the digests it was pulled by."""
        return self.judged_with(self.signatures.of_image(local))

    def needs_image(self, reference: Reference) -> bool:
        """Whether a run of reference is judged by the image present under that name: its signature, under
        the name as written or under its usual name (localhost:05000 is localhost:5000)."""
        return self.signatures.judges_images and any(self.scopes.needs_signature(spelling, self.now())
                                                     for spelling in (reference, reference.alias) if spelling)

    def now(self) -> float:
        return time.time() if self.at is None else self.at

    def evaluate(self, reference: Reference) -> Verdict:
        if reference.repository == DANGLING_REPOSITORY:
            return NAMELESS
        rule = self.whitelist.first_match(reference)
        if rule:
            return rule.verdict
        for spelling in (reference, reference.alias) if reference.alias else (reference,):
            rule = self.blacklist.first_match(spelling)
            if rule:
                if spelling is reference:
                    return rule.verdict
                return Verdict(False, rule.label, f"{rule.verdict.reason} {spelling.familiar}, the same repository"
                                                  " under its usual name", rule)
        if self.scopes.entries:
            verdict = self.scopes.evaluate(reference, self.caller, self.now(), self.signatures)
            if verdict:
                return verdict
        return DEFAULT_ALLOWED if self.default_allow else DEFAULT_DENIED

    def evaluate_all_tags(self, reference: Reference) -> Verdict:
        """A pull without a tag fetches every tag: allow only if every tag is."""
        if reference.repository == DANGLING_REPOSITORY:
            return NAMELESS
        familiar = (reference.familiar_repository + ":",) if reference.has_familiar_form else ()
        canonical = familiar + (reference.repository + ":",)
        for rule in self.whitelist.rules:
            forms = canonical if rule.canonical else familiar
            if rule.only_prefix and any(form.startswith(rule.prefix) for form in forms):   # type: ignore[arg-type]
                return Verdict(True, rule.label, f"{rule.verdict.reason} every tag", rule)
        if self.scopes.entries and not self.blacklist.rules:
            verdict = self.scopes.evaluate_all_tags(reference, self.caller, self.now())
            if verdict:
                return verdict
        if self.default_allow and not self.blacklist.rules:
            return Verdict(True, "defaultAllow", "defaultAllow is true and the blacklist is empty")
        return Verdict(False, "all-tags", "a pull of all tags is allowed only when a whitelist rule of the"
                       " form ^prefix covers every tag; pull a tag or digest instead")

    def allows_operation(self, operation: Operation) -> Verdict:
        return self.operations[operation]

    def configuration(self) -> dict[str, Any]:
        """The configuration in force, every key spelled out as in the file."""
        return {"whitelist": [rule.pattern for rule in self.whitelist.rules],
                "blacklist": [rule.pattern for rule in self.blacklist.rules],
                "scopes": [entry_document(entry) for entry in self.scopes.entries],
                "defaultAllow": self.default_allow, "mode": self.mode, "checkRun": self.check_run,
                **{operation.key: verdict.allow for operation, verdict in self.operations.items()},
                "message": self.message, "tests": [test.document() for test in self.tests]}


# --------------------------------------------------------------------------
# The policy file: the Go plugin's Config, read as Go's encoding/json reads it
# --------------------------------------------------------------------------

# The policy file as Go's encoding/json reads it: the Go plugin's Config
# struct (whitelist, blacklist, defaultAllow) with this plugin's keys beside it.
POLICY_TEST_KEYS = ("image", "operation", "target", "caller", "at", "signed", "expect", "note")
_TEST_FIELDS: dict[str, GoType] = dict(dict.fromkeys(POLICY_TEST_KEYS, STRING), signed=OPTIONAL_BOOL)
_OPERATION_FIELDS: dict[str, GoType] = {key: OPTIONAL_BOOL for key in CONFIG_DEFAULTS if key.startswith("allow")}
POLICY_TEST = GoStruct.of(**_TEST_FIELDS)
SCOPE_ENTRY = GoStruct.of(allow=STRING, deny=STRING, tags=GoSlice(STRING), digestOnly=BOOL, callers=GoSlice(STRING),
                          until=STRING, signedBy=GoSlice(STRING), ticket=STRING, note=STRING)
POLICY_FILE = GoStruct.of(
    whitelist=GoSlice(STRING), blacklist=GoSlice(STRING), scopes=GoSlice(SCOPE_ENTRY), defaultAllow=BOOL,
    mode=STRING, checkRun=BOOL, **_OPERATION_FIELDS, message=STRING, tests=GoSlice(POLICY_TEST))
# The keys the Go plugin read: a file with no others was written for it.
GO_PLUGIN_KEYS = frozenset({"whitelist", "blacklist", "defaultAllow"})


def compile_policy(text: str, path: str) -> Policy:
    """Build a Policy from a configuration file's text; ConfigError says why not.

    The file is read as the Go plugin read it (json.Decoder into its Config
    struct): keys match case-insensitively, null leaves a default, a later
    duplicate is decoded over an earlier one, and text after the object is
    ignored. Unknown keys are refused instead of ignored: a misspelt
    "blacklist" must not drop a blacklist. Every problem is reported at once.
    """
    if not text.strip():
        raise ConfigError(path, "", "the file is empty (an empty policy is {})")
    try:
        document, after = first_json_value(text)
    except json.JSONDecodeError as error:
        raise ConfigError(path, f"line {error.lineno} column {error.colno}", f"invalid JSON: {error.msg}") from None
    except (ValueError, RecursionError) as error:
        raise ConfigError(path, "", f"invalid JSON: {error}") from None
    if not isinstance(document, JSONObject):
        raise ConfigError(path, "", "the configuration must be a JSON object")
    problems = _unknown_keys(document)
    settings: dict[str, Any] = dict(CONFIG_DEFAULTS, whitelist=None, blacklist=None, scopes=None, tests=None)
    try:
        settings = go_decode(document, POLICY_FILE, settings)
    except GoAmbiguity as error:
        problems.append((error.place(), str(error)))
    except GoDecodeError as error:
        such = ' such as {"image": "nginx:1.25", "expect": "allow"}' if error.place().startswith('"tests"[') \
            and error.expected == "an object" else ""
        problems.append((error.place(), f"must be {error.expected}{such}, not {_shown(error.value)}"))
    if settings["mode"] not in MODES:
        problems.append(('"mode"', f'must be "enforce" or "audit", not {_shown(settings["mode"])}'))
    lists = {}
    for kind in ("whitelist", "blacklist"):
        rules = []
        for index, pattern in enumerate(settings[kind].items if settings[kind] else ()):
            try:
                rules.append(compile_rule(path, kind, index, pattern))
            except ConfigError as error:
                problems.append((error.where, error.problem))
        lists[kind] = build_rule_set(rules)
    entries = []
    for index, entry in enumerate(settings["scopes"].items if settings["scopes"] else ()):
        try:
            entries.append(compile_scope_entry(path, index, entry))
        except ConfigError as error:
            problems.append((error.where, error.problem))
    try:
        tests = compile_tests(path, settings["tests"].items if settings["tests"] else ())
    except ConfigError as error:
        problems.append((error.where, error.problem))
    if problems:
        raise ConfigError(path, *problems[0]) if len(problems) == 1 else \
            ConfigError(path, "", "; ".join(f"{where}: {problem}" if where else problem for where, problem in problems))
    default_allow = settings["defaultAllow"]
    operations = {}
    for operation in OPERATIONS.values():
        if not operation.opaque:
            continue
        value = settings[operation.key]
        allowed = default_allow if value is None else value
        origin = f"{operation.key!r} is not set and defaultAllow is {str(allowed).lower()}" if value is None \
            else f"{operation.key!r} is {str(allowed).lower()}"
        operations[operation] = Verdict(allowed, operation.key, f"{origin}; {operation.why}")
    given = [POLICY_FILE.fields[go_fold(key)][0] for key, _ in document]
    return Policy(path, lists["whitelist"], lists["blacklist"], default_allow, settings["mode"],
                  settings["checkRun"], settings["message"], MappingProxyType(operations),
                  sha256(text.encode()).hexdigest(), tests, build_scope_table(entries),
                  keys=frozenset(given), notes=_reading_notes(text, given, after))


def _unknown_keys(document: JSONObject) -> list[tuple[str, str]]:
    """Keys that name no setting, at the top and in each test: the one place this plugin is stricter than Go."""
    unknown = [("", _unknown_key(key, CONFIG_DEFAULTS)) for key, _ in document
               if go_fold(key) not in POLICY_FILE.fields]
    if unknown:
        unknown[-1] = ("", unknown[-1][1] + " (known keys: " + ", ".join(CONFIG_DEFAULTS) + ")")
    for key, items in document:
        for list_key, struct, known in (("tests", POLICY_TEST, POLICY_TEST_KEYS),
                                        ("scopes", SCOPE_ENTRY, SCOPE_ENTRY_KEYS)):
            if go_fold(key) == list_key.upper() and isinstance(items, list):
                for index, item in enumerate(items):
                    for name in [name for name, _ in item if go_fold(name) not in
                                 struct.fields] if isinstance(item, JSONObject) else ():
                        unknown.append((f'"{list_key}"[{index}]', _unknown_key(name, known)
                                        + " (known keys: " + ", ".join(known) + ")"))
    return unknown


def _reading_notes(text: str, given: list[str], after: str) -> tuple[str, ...]:
    """What Go's reading of the file does that its author may not expect: logged at load, shown by --validate."""
    notes = [f"{json.dumps(key)} is given {given.count(key)} times: as Go's decoder does, each is decoded over"
             " the one before, so the last decides" for key in dict.fromkeys(given) if given.count(key) > 1]
    if after.strip():
        line = text.count("\n", 0, len(text) - len(after)) + 1
        notes.append(f"the text after the configuration object (from line {line}) is ignored, as the Go plugin's"
                     " decoder ignored it")
    return tuple(notes)


@dataclass(frozen=True)
class PolicyTest:
    """One expectation a policy file carries: {"image": "nginx:1.25", "expect": "allow"}."""

    index: int
    operation: Operation   # one with a command
    image: str
    target: str        # a tag's new name
    allow: bool
    note: str
    caller: str = ""   # a caller selector: judged as that caller
    at: str = ""       # a date or time: judged then
    signed: bool | None = None   # whether a listed key signed the image; None: no signature can be checked

    def policy(self, policy: Policy) -> Policy:
        """policy as it judges this test: for its caller, at its time, with its signature."""
        at = parse_time(self.at) if self.at else None
        policy = dataclasses.replace(policy.asked_by(caller_of_selectors([self.caller] if self.caller else [])), at=at)
        if self.signed is None:
            return policy
        return policy.judged_with(OfflineSignatures(SignatureVerdict(
            self.signed, "signed, as the test says" if self.signed else "not signed, as the test says")))

    def document(self) -> dict[str, Any]:
        written = {"image": self.image, "operation": self.operation.command, "target": self.target, "caller": self.caller,
                   "at": self.at, "expect": "allow" if self.allow else "deny", "note": self.note}
        document: dict[str, Any] = {key: value for key, value in written.items()
                                    if value and (key, value) != ("operation", "pull")}
        return document if self.signed is None else dict(document, signed=self.signed)

    def __str__(self) -> str:
        what = f"{self.operation} of {self.image}" if self.image else self.operation
        return (f'"tests"[{self.index}] ({what}' + (f" as {self.target}" if self.target else "")
                + (f" by {self.caller}" if self.caller else "") + (f" at {self.at}" if self.at else "")
                + ("" if self.signed is None else ", signed" if self.signed else ", unsigned") + ")")


def compile_tests(path: str, tests: tuple[dict[str, Any], ...]) -> tuple[PolicyTest, ...]:
    """The "tests" list, decoded: each with image and expect, and optionally operation, target and note."""
    compiled = []
    for index, test in enumerate(tests):
        where = f'"tests"[{index}]'
        expect = test.get("expect", "")
        if expect not in ("allow", "deny"):
            raise ConfigError(path, where, '"expect" must be "allow" or "deny", '
                                           + (f"not {_shown(expect)}" if expect else "and is missing"))
        given = test.get("operation") or "pull"
        # The decision log's names are taken too: "pull (all tags)", "plugin install".
        operation = COMMANDS.get(given) or OPERATIONS.get(given)
        if operation is None or not operation.command:
            raise ConfigError(path, where, f'"operation" must be one of {", ".join(COMMANDS)},'
                                           f" not {_shown(given)}")
        image, target = test.get("image", ""), test.get("target", "")
        if operation.opaque:
            if image:
                raise ConfigError(path, where, f"a {operation} names no image: remove \"image\"")
        elif not image:
            raise ConfigError(path, where, f'"image" is missing: a {operation} names an image')
        if (operation is TAG) != bool(target):
            raise ConfigError(path, where, '"target", the new name, is needed for a tag and only for a tag')
        if image and not IMAGE_ID_LIKE_RE.fullmatch(image):
            try:
                parse_reference(image)
            except InvalidReference as error:
                raise ConfigError(path, where, f'"image": {error}: a test of a name dockerd refuses proves'
                                               " nothing") from None
        caller, at = test.get("caller", ""), test.get("at", "")
        if caller and not CALLER_SELECTOR_RE.fullmatch(caller):
            raise ConfigError(path, where, f'"caller" must be cn:NAME, o:NAME, ou:NAME or unidentified, not'
                                           f" {_shown(caller)}")
        if at and parse_time(at) is None:
            raise ConfigError(path, where, f'"at" must be a date (2027-01-31) or an RFC 3339 time with its zone,'
                                           f" not {_shown(at)}")
        compiled.append(PolicyTest(index, operation, image, target, expect == "allow", test.get("note", ""),
                                   caller, at, test.get("signed")))
    return tuple(compiled)


def _unknown_key(key: str, known: Iterable[str]) -> str:
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    return f"unknown key {json.dumps(key)}" + (f" (did you mean {json.dumps(close[0])}?)" if close else "")


# Canonical names of Docker Hub images that no familiar-name rule was written for.
HUB_PROBES = ("docker.io/library/zz0:1", "docker.io/zz0/zz0:1")


def compile_rule(path: str, kind: str, index: int, pattern: str) -> Rule:
    """A rule as Go's regexp reads it: Python's re where it cannot take long, else a LinearMatcher."""
    def refuse(detail: str) -> ConfigError:
        return ConfigError(path, f"{json.dumps(kind)}[{index}]",
                           f"invalid regular expression {json.dumps(pattern)}: {detail}")
    parser = RE2Parser(pattern)
    try:
        tree = parser.parse()
        regex = re.compile(python_pattern(tree), re.ASCII)
        degree = backtracking_degree(tree)
        search: Callable[[str], Any] = regex.search
        if degree > MAX_BACKTRACKING_DEGREE and not parser.extended:
            search = LinearMatcher(tree).search
    except RE2Error as error:
        raise refuse(f"{error} (rules are RE2 syntax, as Go's regexp reads them)") from None
    except re.error as error:
        raise refuse(f"{error.msg} (in Python's syntax of the look-around or back-reference)") from None
    except RecursionError:
        raise refuse("expression nests too deeply") from None
    if degree > MAX_BACKTRACKING_DEGREE and parser.extended:
        raise refuse(f"{STALLS} (with a look-around or back-reference it cannot be matched in linear time;"
                     " rewrite it without repetition of repetition, or without several unbounded repetitions"
                     " such as .* that can match the same characters)")
    # The Go plugin matched the name as the client sent it, familiar or canonical (docker.io/library/…, as
    # today's CLI sends). A whitelist rule sees the canonical form only when it names docker.io, so that
    # ^docker does not admit all of Docker Hub; a blacklist rule also when it refuses no Docker Hub image
    # by the canonical form alone (\.io/badorg/, /library/evil), so that ^d does not refuse all of it.
    canonical = names_docker_hub(_flattened(tree)) or \
        kind == "blacklist" and not all(search(probe) for probe in HUB_PROBES)
    return Rule(kind, index, pattern, regex, search, *literal_prefix(regex, search), canonical=canonical)


# Why a rule with Python's syntax is refused when re could take long on it.
STALLS = ("Python's re can take time polynomial of high degree or exponential in the length of a name on this"
          " rule, and one pull of a crafted name would stall every Docker API call on this host")


def load_policy(path: str) -> Policy:
    try:
        with open(path, "rb") as file:
            data = file.read()
    except OSError as error:
        raise ConfigError(path, "", f"cannot read the configuration: {error}") from None
    return compile_policy(data.decode("utf-8", "docker-image-policy-go"), path)


# --------------------------------------------------------------------------
# Requests: reading an AuthZReq the way dockerd reads the request
# --------------------------------------------------------------------------

# How json.dumps writes a string (ensure_ascii): the decision log's fields are written string by string.
_json_string = json.encoder.encode_basestring_ascii   # type: ignore[attr-defined]


@dataclass(frozen=True)
class Decision:
    """One authorization decision: answered, logged and counted the same way."""

    allow: bool
    operation: Operation
    image: str = ""      # canonical form, when the operation names an image
    familiar: str = ""
    rule: str = ""
    reason: str = ""
    user: str = ""       # the TLS client user dockerd reports, if any
    named: str = ""      # the image as the request named it (a run's, service's or tag's), if not image
    target: str = ""     # a tag's new name, canonical
    caller: Caller = UNIDENTIFIED   # who asked, when dockerd identified the client by its TLS certificate
    decided_by: Rule | ScopeEntry | None = dataclasses.field(default=None, compare=False, repr=False)   # rule names it

    @functools.cached_property
    def log_fields(self) -> str:
        """The decision log's fields, rendered when first logged: a remembered decision is logged again and
        again, and under --log-decisions none never."""
        fields: dict[str, Any] = {"operation": self.operation.name, "image": self.image, "rule": self.rule,
                                  "reason": self.reason}
        # What --replay needs to decide it again: the name a run, service or tag gave (an image ID, a
        # short ID, a tag's source) when image does not already say it, and a tag's new name.
        if self.named and (IMAGE_ID_LIKE_RE.fullmatch(self.named) or not _names_image(self.named, self.image)):
            fields["name"] = self.named
        if self.target:
            fields["target"] = self.target
        if self.user:
            fields["user"] = self.user
        if self.caller.identified:
            fields["caller"] = self.caller.document()
        # As json.dumps(fields) writes it, each string by json's own encoder: this is on every decision's path.
        pairs = (f"{_json_string(key)}: {_json_string(value) if isinstance(value, str) else json.dumps(value)}"
                 for key, value in fields.items())
        text = "{" + ", ".join(pairs) + "}"
        if len(text) > MAX_LOG_FIELD:
            text = json.dumps({key: _capped(value) for key, value in fields.items()})
        return text[1:]

    def message(self, policy: Policy | None) -> str:
        what = f"{self.operation} of {self.familiar}" if self.familiar else self.operation
        text = f"{what} {'allowed' if self.allow else 'denied'}: {self.reason}"
        if not self.allow and policy is not None and policy.message:
            text += f". {policy.message}"
        return text


def _capped(text: Any) -> Any:
    """text cut so that its JSON encoding takes at most MAX_LOG_FIELD bytes, saying how long it was."""
    if len(json.dumps(text)) <= MAX_LOG_FIELD:
        return text
    if not isinstance(text, str):   # the caller's certificate subject
        text = json.dumps(text)
    note = f"… (cut, {len(text)} characters)"
    keep = MAX_LOG_FIELD
    while len(json.dumps(text[:keep] + note)) > MAX_LOG_FIELD:
        keep = keep * 3 // 4
    return text[:keep] + note


def _names_image(name: str, canonical: str) -> bool:
    """Whether name, read as a reference, is the image canonical."""
    try:
        return name == canonical or parse_reference(name).canonical == canonical
    except InvalidReference:
        return False


BENIGN = Decision(True, OTHER_REQUEST, reason="not an image operation")


class Unreadable(ImagePolicyError):
    """A request the plugin cannot read as dockerd would: always a deny."""


_SCHEME_RE = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:")
_VERSION_PREFIX_RE = re.compile(r"/v[0-9.]+(?=/)")


def _unescape(text: str, plus_is_space: bool) -> str:
    """Go's url unescaping: a bad %-escape or invalid UTF-8 is an error."""
    if "%" not in text and not (plus_is_space and "+" in text):
        return text
    if plus_is_space:
        text = text.replace("+", " ")
    if "%" in text and re.search(r"%(?![0-9A-Fa-f]{2})", text):
        raise Unreadable(f"invalid %-escape in {shown(text)}")
    try:
        return unquote_to_bytes(text).decode("utf-8")
    except UnicodeDecodeError:
        raise Unreadable(f"invalid UTF-8 after unescaping {shown(text)}") from None


def split_target(target: str) -> tuple[str, str]:
    """Path (decoded, cleaned, version prefix removed) and raw query of a target."""
    absolute = not target.startswith("/")
    if absolute:
        scheme = _SCHEME_RE.match(target)
        if not scheme:
            raise Unreadable(f"request target {shown(target)} is neither a path nor an absolute URL")
        target = target[scheme.end():]
    raw_path, _, query = target.partition("?")  # '#' is not a fragment in a request target
    if absolute and raw_path.startswith("//"):   # http://host/path: drop the authority
        slash = raw_path.find("/", 2)
        raw_path = raw_path[slash:] if slash != -1 else ""
    if not raw_path.startswith("/"):
        raise Unreadable(f"request target {shown(target)} has no absolute path")
    path = _unescape(raw_path, plus_is_space=False) if "%" in raw_path else raw_path
    if "//" in path or "/." in path:
        # dockerd redirects unclean paths instead of serving them; judging
        # the cleaned path is at least as strict.
        parts: list[str] = []
        for part in path.split("/"):
            if part == "..":
                parts = parts[:-1]
            elif part not in ("", "."):
                parts.append(part)
        path = "/" + "/".join(parts)
    version = _VERSION_PREFIX_RE.match(path)
    return (path[version.end():] if version else path), query


def parse_query(query: str) -> dict[str, str]:
    """Go's r.Form for a query: '&' separates, '+' is space, first value wins."""
    values: dict[str, str] = {}
    for pair in query.split("&"):
        if not pair:
            continue
        if ";" in pair:
            raise Unreadable("';' in the query (dockerd rejects such requests)")
        key, _, value = pair.partition("=")
        values.setdefault(_unescape(key, True), _unescape(value, True))
    return values


def go_lower(text: str) -> str:
    """Go's strings.ToLower, which mime.ParseMediaType applies: one rune to one.

    Python's lower() maps U+0130 (İ) to "i" and a combining dot, so
    "applİcation/x-www-form-urlencoded" is a form to dockerd and not to it.
    """
    return text.lower() if text.isascii() else "".join("i" if c == "\u0130" else c.lower() for c in text)


class Request:
    """The parts of an AuthZReq that decisions need, read like dockerd."""

    def __init__(self, authz: dict[str, Any]) -> None:
        self.authz = authz
        method, target = authz.get("RequestMethod"), authz.get("RequestUri")
        if not isinstance(method, str) or not isinstance(target, str):
            raise Unreadable("the AuthZ request has no RequestMethod or RequestUri string")
        if len(target) > MAX_TARGET:
            raise Unreadable(f"a request target of {len(target)} characters, longer than dockerd reads")
        self.method, self.target = method, target
        self.path, self.raw_query = split_target(target)
        self._query: dict[str, str] | None = None
        self.vars: dict[str, str] = {}   # what the route's path names, as dockerd's router's mux.Vars

    @property
    def query(self) -> dict[str, str]:
        if self._query is None:
            self._query = parse_query(self.raw_query)
        return self._query

    @functools.cached_property
    def headers(self) -> dict[str, tuple[str, Any]]:
        """Each header by its lower-case name: the name as sent and its value, the first of a name."""
        headers = self.authz.get("RequestHeaders") or {}
        if not isinstance(headers, dict):
            raise Unreadable("RequestHeaders is not an object")
        found: dict[str, tuple[str, Any]] = {}
        for key, value in headers.items():
            if key.isascii():   # Go canonicalizes ASCII names only
                found.setdefault(key.lower(), (key, value))
        return found

    def header(self, name: str) -> str | None:
        """The value of a header, name in lower case."""
        found = self.headers.get(name)
        if found is None:
            return None
        key, value = found
        if not isinstance(value, str):
            raise Unreadable(f"header {key} is not a string")
        return value

    def body(self) -> bytes:
        """The JSON body dockerd will decode; no visible body means deny."""
        encoded = self.authz.get("RequestBody")
        if encoded is not None and not isinstance(encoded, str):
            raise Unreadable("RequestBody is not a base64 string")
        try:
            body = base64.b64decode(encoded or "", validate=True)
        except (binascii.Error, ValueError):
            raise Unreadable("RequestBody is not valid base64") from None
        if not body:
            # CVE-2024-41110, CVE-2026-34040: dockerd withholds bodies that
            # are not application/json, too large, chunked or of unknown size.
            raise Unreadable("dockerd did not forward the request body (it forwards only application/json"
                             " bodies under its size limit), so the image cannot be checked")
        return body

    def check_no_form_body(self) -> None:
        """Deny when a form-encoded body that dockerd does not forward may set query values."""
        content_type = self.header("content-type") or ""
        if (go_lower(content_type.split(";")[0]).strip() == "application/x-www-form-urlencoded"
                and self.header("content-length") != "0"):
            raise Unreadable("a form-encoded body may override the query, and dockerd does not forward it")

    def check_query_is_whole(self) -> None:
        """Deny when dockerd may take form values from a body the plugin cannot see."""
        self.check_no_form_body()
        self.check_body_is_seen()

    def check_body_is_seen(self) -> None:
        """Deny when a body the plugin cannot see may carry form values (the form check already done)."""
        if self.header("content-type") is None or self.header("content-length") == "0":
            return   # no Content-Type at all: dockerd does not parse the body as a form
        if self.authz.get("RequestBody") is not None:
            return
        # Only the last of repeated Content-Type headers reaches the plugin,
        # while dockerd parses the form by the first: a hidden body is unsafe.
        raise Unreadable("the request carries a body the plugin cannot see, and dockerd may read"
                         " form values from it")


# The subject attributes a caller selector reads: CN, O and OU (RFC 5280).
_SUBJECT_OIDS = MappingProxyType({bytes.fromhex("550403"): "cn", bytes.fromhex("55040a"): "o",
                                  bytes.fromhex("55040b"): "ou"})


def caller_of(authz: dict[str, Any]) -> Caller:
    """The caller dockerd identified: the subject of the first TLS client certificate it forwards.

    dockerd sets UserAuthNMethod "TLS", User (the certificate's CN) and
    RequestPeerCertificates (base64 of PEM) only for a client that presented
    a certificate it verified (--tlsverify); anything else is unidentified.
    """
    if not authz.get("User") and not authz.get("UserAuthNMethod") and not authz.get("RequestPeerCertificates"):
        return UNIDENTIFIED
    try:
        certificates = authz["RequestPeerCertificates"]
        pem = base64.b64decode(certificates[0], validate=True).decode("ascii")
        der = base64.b64decode("".join(pem.strip().splitlines()[1:-1]), validate=True)
        subject = certificate_subject(der)
        common_name = subject["cn"][-1] if subject["cn"] else ""   # Go's pkix.Name keeps the last CN
        if authz.get("UserAuthNMethod") != "TLS" or authz.get("User") != common_name:
            raise ValueError("the User dockerd reports is not the certificate's CN")
        # Matched whole: a selector sees every value, however long (only their display is cut).
        return Caller(True, common_name, tuple(subject["o"]), tuple(subject["ou"]))
    except (KeyError, IndexError, TypeError, ValueError, UnicodeError, binascii.Error):
        return Caller(True, unreadable=True)


def _der(data: bytes, at: int) -> tuple[int, int, int]:
    """The tag, value start and value end of the DER element at data[at]."""
    tag, length = data[at], data[at + 1]
    at += 2
    if length & 0x80:
        count = length & 0x7F
        if not 1 <= count <= 3:
            raise ValueError("unsupported DER length")
        length = int.from_bytes(data[at:at + count], "big")
        at += count
    if at + length > len(data):
        raise ValueError("truncated DER")
    return tag, at, at + length


# The ASN.1 string types Go's encoding/asn1 reads into a Go string, by tag.
_STRING_TYPES = MappingProxyType({0x0C: "utf-8", 0x12: "ascii", 0x13: "ascii", 0x14: "latin-1", 0x16: "ascii",
                                  0x1E: "utf-16-be"})


def certificate_subject(der: bytes) -> dict[str, list[str]]:
    """CN, O and OU of an X.509 certificate's subject."""
    _, start, _ = _der(der, 0)                   # Certificate
    tag, at, end = _der(der, start)              # TBSCertificate
    elements = []
    while at < end:
        element = _der(der, at)
        elements.append(element)
        at = element[2]
    fields = elements[1:] if elements[0][0] == 0xA0 else elements   # [0] version
    tag, at, end = fields[4]                     # serial, signature, issuer, validity, subject
    if tag != 0x30:
        raise ValueError("no subject")
    subject: dict[str, list[str]] = {"cn": [], "o": [], "ou": []}
    while at < end:                              # RDNs: SET OF AttributeTypeAndValue
        _, rdn, rdn_end = _der(der, at)
        at = rdn_end
        while rdn < rdn_end:
            _, pair, pair_end = _der(der, rdn)
            rdn = pair_end
            oid_tag, oid, oid_end = _der(der, pair)
            value_tag, value, value_end = _der(der, oid_end)
            name = _SUBJECT_OIDS.get(der[oid:oid_end]) if oid_tag == 0x06 else None
            encoding = _STRING_TYPES.get(value_tag)
            if name and encoding:   # Go's pkix.Name skips a value that is no string
                text = der[value:value_end]
                if value_tag == 0x1E and text.endswith(b"\0\0"):   # Go drops a BMPString's terminator
                    text = text[:-2]
                subject[name].append(text.decode(encoding))
    return subject


# --------------------------------------------------------------------------
# JSON bodies, decoded the way Go's encoding/json fills dockerd's structs
# --------------------------------------------------------------------------

MOUNTS = GoSlice(GoStruct.of(Type=STRING, Source=STRING))
# The parts of dockerd's request types that name images: CreateRequest
# (an embedded *Config, HostConfig *HostConfig) and swarm's ServiceSpec.
CREATE_REQUEST = GoStruct.of(Image=STRING, HostConfig=GoStruct.of(pointer=True, Mounts=MOUNTS))
SERVICE_SPEC = GoStruct.of(TaskTemplate=GoStruct.of(
    ContainerSpec=GoStruct.of(pointer=True, Image=STRING, Mounts=MOUNTS),
    PluginSpec=GoStruct.of(pointer=True, Remote=STRING),
    Runtime=STRING))


def decode_body(body: bytes, kind: GoStruct) -> dict[str, Any]:
    """Decode a body as dockerd's json.Decoder does: the first JSON value, into kind."""
    values = body.count(b"{") + body.count(b"[") + body.count(b",")
    if values > MAX_BODY_VALUES:
        raise Unreadable(f"the request body holds about {values:,} JSON values, more than any container or service"
                         f" dockerd creates ({MAX_BODY_VALUES:,}): not decoded")
    try:
        # Engines before 25 ignore what follows the value; newer ones reject it.
        document, _ = first_json_value(body.decode("utf-8", "docker-image-policy-go"))
        return go_decode(document, kind, None) or {}
    except GoAmbiguity as error:
        raise Unreadable(f"{error}: dockerd's own build decides") from None
    except GoDecodeError as error:
        raise Unreadable(f"dockerd rejects this body: {error}") from None
    except ValueError as error:
        raise Unreadable(f"the request body is not valid JSON ({error})") from None
    except RecursionError:
        raise Unreadable("the request body is nested too deeply to read") from None


def _field(struct: dict[str, Any] | None, name: str) -> Any:
    return (struct or {}).get(name)


def _image_mounts(mounts: SliceValue | None, swarm: bool) -> list[str]:
    """The images a container's or service's mounts use, each once."""
    sources: dict[str, None] = {}
    for mount in mounts.items if mounts else ():
        kind = mount.get("Type") or ""
        # dockerd takes exactly "image"; swarm's converter upper-cases the type first.
        if (kind.upper() == "IMAGE") if swarm else (kind == "image"):
            sources[mount.get("Source") or ""] = None
    if len(sources) > MAX_IMAGE_MOUNTS:
        raise Unreadable(f"{len(sources)} different images mounted, more than any container needs"
                         f" ({MAX_IMAGE_MOUNTS}): each is an image to judge")
    return list(sources)


def images_in_body(kind: str, body: bytes) -> tuple[str, ...]:
    """The images dockerd will use for a run ("run") or service ("service") body.

    A run names its Image, then the Source of each image mount. A service
    runs its ContainerSpec when TaskTemplate.Runtime is empty or "container"
    and its PluginSpec when it is "plugin" (moby's convert/service.go).
    """
    if kind == "run":
        request = decode_body(body, CREATE_REQUEST)
        return (request.get("Image") or "", *_image_mounts(_field(request.get("HostConfig"), "Mounts"), swarm=False))
    task = decode_body(body, SERVICE_SPEC).get("TaskTemplate") or {}
    runtime = task.get("Runtime") or ""
    if runtime in ("", "container"):
        container = task.get("ContainerSpec")
        if container is None:
            raise Unreadable("dockerd rejects this service: its runtime is container and it has no ContainerSpec")
        return (container.get("Image") or "", *_image_mounts(container.get("Mounts"), swarm=True))
    if runtime == "plugin":
        if task.get("PluginSpec") is None:
            raise Unreadable("dockerd rejects this service: its runtime is plugin and it has no PluginSpec")
        return (task["PluginSpec"].get("Remote") or "",)
    raise Unreadable(f"dockerd rejects this service: unsupported runtime {shown(runtime)}")


# --------------------------------------------------------------------------
# Docker API (read-only image and service inspection)
# --------------------------------------------------------------------------

@dataclass(frozen=True)
class LocalImage:
    """An image on the daemon: its ID and every name it has."""

    id: str
    names: tuple[str, ...]


@dataclass(frozen=True)
class LocalContainer:
    """A container on the daemon: image is what it was created from (a name or an ID), as dockerd lists it."""

    id: str
    name: str
    image: str
    image_id: str


@dataclass(frozen=True)
class LocalService:
    """A swarm service and its spec, as GET /services lists them."""

    id: str
    name: str
    spec: dict[str, Any]


class Docker:
    """What a decision may ask the daemon (read-only); see DockerAPI."""

    def images_for(self, text: str) -> list[LocalImage]:
        """Every local image that dockerd could take text to mean now."""
        raise NotImplementedError

    def service(self, name: str) -> dict[str, Any]:
        """A service as GET /services/{name} returns it."""
        raise NotImplementedError


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.socket_path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.socket_path)


def _names(answer: dict[str, Any]) -> tuple[str, ...]:
    names = (answer.get("RepoTags") or []) + (answer.get("RepoDigests") or [])
    if not all(isinstance(name, str) for name in names):
        raise ValueError("names that are not strings")
    return tuple(name for name in names if not name.startswith("<none>"))   # "<none>" marks no name


@dataclass(frozen=True)
class DockerAPI(Docker):
    """Asks the daemon which images a name or ID means, and what a service ran before."""

    host: str
    timeout: float = DOCKER_API_TIMEOUT

    def connection(self) -> http.client.HTTPConnection:
        if self.host.startswith("unix://"):
            return _UnixHTTPConnection(self.host[len("unix://"):], self.timeout)
        if self.host.startswith("tcp://"):
            return http.client.HTTPConnection(self.host[len("tcp://"):], timeout=self.timeout)
        raise ImagePolicyError(f"unsupported --docker-host {self.host!r} (use unix:// or tcp://)")

    def get(self, path: str, absent: frozenset[int] = frozenset({HTTPStatus.NOT_FOUND})) -> Any:
        """The decoded answer to GET path; None for 404 (or another status in absent)."""
        connection = self.connection()
        try:
            connection.request("GET", path)
            response = connection.getresponse()
            body = response.read(MAX_BODY)
        except (OSError, http.client.HTTPException) as error:
            raise ImagePolicyError(f"Docker API at {self.host}: {error}") from None
        finally:
            connection.close()
        if response.status in absent:
            return None
        try:
            if response.status != HTTPStatus.OK:
                raise ValueError(f"status {response.status}")
            return json.loads(body)
        except ValueError as error:
            raise ImagePolicyError(f"unexpected answer from {self.host} to GET {path}: {error}") from None

    def images_for(self, text: str) -> list[LocalImage]:
        found = {}
        try:
            inspected = self.get(f"/images/{quote(text, safe=':')}/json")   # what dockerd resolves now
            if inspected is not None:
                found[inspected["Id"]] = LocalImage(inspected["Id"], _names(inspected))
            prefix = text.removeprefix("sha256:")
            # and every image whose ID it starts, if that name goes away (only hex can start an ID)
            if len(prefix) < 64 and IMAGE_ID_LIKE_RE.fullmatch(text):
                for image in self.images():
                    if image.id.removeprefix("sha256:").startswith(prefix):
                        found.setdefault(image.id, image)
        except (KeyError, TypeError, AttributeError, ValueError) as error:
            raise ImagePolicyError(f"unexpected image list from {self.host}: {error!r}") from None
        return list(found.values())

    def images(self) -> list[LocalImage]:
        """Every image on the daemon, named or not."""
        try:
            return [LocalImage(image["Id"], _names(image)) for image in self.get("/images/json?all=1") or []]
        except (KeyError, TypeError, AttributeError, ValueError) as error:
            raise ImagePolicyError(f"unexpected image list from {self.host}: {error!r}") from None

    def containers(self) -> list[LocalContainer]:
        """Every container, running or not, with the image it was created from."""
        try:
            return [LocalContainer(container["Id"], (container.get("Names") or ["/"])[0].lstrip("/"),
                                   container["Image"], container.get("ImageID") or "")
                    for container in self.get("/containers/json?all=1") or []]
        except (KeyError, TypeError, AttributeError, IndexError) as error:
            raise ImagePolicyError(f"unexpected container list from {self.host}: {error!r}") from None

    def services(self) -> list[LocalService] | None:
        """Every swarm service with its spec; None when the daemon is no swarm manager (503)."""
        answer = self.get("/services", absent=frozenset({HTTPStatus.NOT_FOUND, HTTPStatus.SERVICE_UNAVAILABLE}))
        if answer is None:
            return None
        try:
            return [LocalService(service["ID"], service["Spec"].get("Name") or service["ID"], service["Spec"])
                    for service in answer]
        except (KeyError, TypeError, AttributeError) as error:
            raise ImagePolicyError(f"unexpected service list from {self.host}: {error!r}") from None

    def service(self, name: str) -> dict[str, Any]:
        answer = self.get(f"/services/{quote(name, safe='')}?insertDefaults=false")
        if answer is None:
            raise ImagePolicyError(f"no such service {name!r}")
        if not isinstance(answer, dict):
            raise ImagePolicyError(f"unexpected service answer from {self.host}")
        return answer


# --------------------------------------------------------------------------
# Routes: one function per route that can bring in or run an image
# --------------------------------------------------------------------------

Route = Callable[[Policy, Request, "Docker | None"], "Decision"]


def decide(policy: Policy, authz: dict[str, Any], docker: Docker | None) -> Decision:
    """The decision for one AuthZReq; the error boundary for reading it."""
    method = authz.get("RequestMethod")
    if isinstance(method, str) and method.upper() != "POST":
        return BENIGN  # every route that brings in or runs an image is a POST
    operation = REQUEST
    user = authz.get("User")   # the TLS client user dockerd reports, logged with the decision
    user = user if isinstance(user, str) else ""
    try:
        request = Request(authz)
        found = find_route(request)
        if found is None:
            return BENIGN
        operation, route = found
        caller = caller_of(authz)
        if caller.identified:
            policy = policy.asked_by(caller)
        decision = route(policy, request, docker)
        caller = caller if caller.identified else policy.caller
        return dataclasses.replace(decision, caller=caller, user=user) if caller.identified or user else decision
    except (Unreadable, InvalidReference) as error:
        return Decision(False, operation, rule="unreadable", reason=str(error), user=user)


def find_route(request: Request) -> tuple[Operation, Route] | None:
    """The route of request's path, with what the path names in request.vars."""
    # Matched case-insensitively: a route dockerd would answer 404 may be denied.
    route = ROUTES.get(request.path.lower())
    if route:
        return route
    for pattern, route in ROUTE_PATTERNS:
        match = pattern.fullmatch(request.path)
        if match:
            request.vars = match.groupdict()
            return route
    return None


def decide_images_create(policy: Policy, request: Request, docker: Docker | None) -> Decision:
    # Asked first: a form body dockerd does not forward may carry fromImage.
    request.check_no_form_body()
    query = request.query
    if not query.get("fromImage"):
        return decide_opaque(policy, IMPORT)
    request.check_body_is_seen()
    reference, all_tags = pull_reference(query["fromImage"], query.get("tag", ""))
    return decide_pull(policy, reference, all_tags)


def decide_pull(policy: Policy, reference: Reference, all_tags: bool) -> Decision:
    if all_tags:
        verdict = policy.evaluate_all_tags(reference)
        return Decision(verdict.allow, PULL_ALL_TAGS, reference.repository, reference.familiar_repository,
                        verdict.rule, verdict.reason, decided_by=verdict.decided_by)
    return decision_for(PULL, reference, policy.evaluate(reference))


def decide_run(policy: Policy, request: Request, docker: Docker | None) -> Decision:
    if not policy.check_run:
        return unchecked(RUN)
    image, *mounts = images_in_body("run", request.body())
    return first_denial(itertools.chain([decide_image_name(policy, RUN, image, docker)],
                                        (decide_image_name(policy, IMAGE_MOUNT, source, docker) for source in mounts)))


def decide_service(policy: Policy, request: Request, docker: Docker | None) -> Decision:
    specs = []
    rollback = request.query.get("rollback", "") if "service" in request.vars else ""   # an update
    if rollback != "previous":
        specs.append(images_in_body("service", request.body()))
    if rollback:
        # dockerd deploys the service's previous spec and ignores the body.
        if docker is None:
            raise Unreadable("a rollback runs the service's previous spec, which needs the Docker API")
        try:
            previous = docker.service(request.vars["service"]).get("PreviousSpec")
        except ImagePolicyError as error:
            raise Unreadable(f"cannot read the service's previous spec: {error}") from None
        if not isinstance(previous, dict):
            raise Unreadable("the service has no previous spec to roll back to")
        specs.append(images_in_body("service", json.dumps(previous).encode()))
    return first_denial((decide_image_name(policy, SERVICE, image, docker, pulled_first=True)
                         for spec in specs for image in spec))


def decide_plugin_pull(policy: Policy, request: Request, docker: Docker | None) -> Decision:
    request.check_query_is_whole()
    remote = request.query.get("remote", "")
    if not remote:
        raise Unreadable("a plugin pull without a 'remote' image")
    reference = parse_reference(remote)
    return decision_for(PLUGIN_INSTALL, reference, policy.evaluate(reference))


def decide_tag(policy: Policy, request: Request, docker: Docker | None) -> Decision:
    """A new name for a present image: the image must be allowed, and so must its new name."""
    if not policy.check_run:
        return unchecked(TAG)
    request.check_query_is_whole()
    name = request.vars["name"]
    source = decide_image_name(policy, TAG, name, docker)
    if not source.allow:
        with contextlib.suppress(InvalidReference):   # logged for --replay; the source's denial stands
            source = dataclasses.replace(source, target=tag_target(request).canonical)
        return source
    target = tag_target(request)
    if not policy.needs_image(target):
        return decide_tag_target(policy, source, target)
    # A new name in a signed scope: the image itself must be signed there, whatever its source name was.
    try:
        images = present_images(docker, name)
    except ImagePolicyError as error:
        return decide_tag_target(policy.judged_with(cannot_look_up(error)), source, target)
    return first_denial([decide_tag_target(policy.of_image(local), source, target) for local in images]
                        or [decide_tag_target(policy.judged_with(NOT_PRESENT), source, target)])


def tag_target(request: Request) -> Reference:
    target = parse_reference(request.query.get("repo", ""))
    tag = request.query.get("tag", "")
    if target.digest:
        raise InvalidReference("cannot tag with a digest reference")
    if tag:
        if not TAG_RE.fullmatch(tag):
            raise InvalidReference(f"invalid tag {tag!r}")
        target = dataclasses.replace(target, tag=tag)
    return target


def decide_tag_target(policy: Policy, source: Decision, target: Reference) -> Decision:
    """A tag whose source image is allowed (source) is decided by its new name."""
    verdict = policy.evaluate(target)
    return Decision(verdict.allow, TAG, target.canonical, f"{source.familiar} as {target.familiar}",
                    verdict.rule, f"{verdict.reason} for the new name", named=source.named or source.familiar,
                    target=target.canonical, decided_by=verdict.decided_by)


def unchecked(operation: Operation) -> Decision:
    return Decision(True, operation, rule="checkRun", reason="checkRun is false")


def opaque(operation: Operation) -> tuple[Operation, Route]:
    return operation, lambda policy, request, docker: decide_opaque(policy, operation)


def decide_opaque(policy: Policy, operation: Operation) -> Decision:
    verdict = policy.allows_operation(operation)
    return Decision(verdict.allow, operation, rule=verdict.rule, reason=verdict.reason)


# What the plugin does with POST /X: the operation its decisions are logged
# and counted as (until the route names a more exact one), and who decides.
# Paths are as dockerd registers them, after the optional /vN.NN prefix.
ROUTES: MappingProxyType[str, tuple[Operation, Route]] = MappingProxyType({
    "/images/create": (PULL_OR_IMPORT, decide_images_create),
    "/images/load": opaque(LOAD),
    "/build": opaque(BUILD),
    "/session": opaque(BUILD),   # BuildKit, over a hijacked connection
    "/grpc": opaque(BUILD),
    "/commit": opaque(COMMIT),
    "/containers/create": (RUN, decide_run),
    "/services/create": (SERVICE, decide_service),
    "/plugins/pull": (PLUGIN_INSTALL, decide_plugin_pull),
    "/plugins/create": opaque(PLUGIN_CREATE),
    "/swarm/init": opaque(SWARM),
    "/swarm/join": opaque(SWARM),
})
ROUTE_PATTERNS: tuple[tuple[re.Pattern[str], tuple[Operation, Route]], ...] = (
    (re.compile(r"/images/(?P<name>.+)/tag", re.I | re.S), (TAG, decide_tag)),
    (re.compile(r"/services/(?P<service>.+)/update", re.I | re.S), (SERVICE, decide_service)),
    (re.compile(r"/plugins/.+/upgrade", re.I | re.S), (PLUGIN_INSTALL, decide_plugin_pull)),
)


def decision_for(operation: Operation, reference: Reference, verdict: Verdict, named: str = "") -> Decision:
    return Decision(verdict.allow, operation, reference.canonical, reference.familiar, verdict.rule, verdict.reason,
                    named=named, decided_by=verdict.decided_by)


def first_denial(decisions: Iterable[Decision]) -> Decision:
    """The first denial, deciding nothing after it; or the first decision, when all allow."""
    first = None
    for decision in decisions:
        if not decision.allow:
            return decision
        first = first or decision
    if first is None:
        raise Unreadable("the request names no image")
    return first


def decide_image_name(policy: Policy, operation: Operation, image: str, docker: Docker | None,
                      pulled_first: bool = False) -> Decision:
    """Decide on an image given by name, digest, ID or short ID.

    pulled_first: dockerd pulls the name before it looks it up, as a swarm
    task does for anything but a whole sha256:<64 hex>, so a name that is
    also a short ID (3f9a, sha256:3f9a) must be allowed as a name too.
    """
    if not image:
        raise Unreadable(f"the {operation} request names no image")
    if docker is None or not IMAGE_ID_LIKE_RE.fullmatch(image):
        reference = parse_reference(image)
        if not policy.needs_image(reference):
            return decision_for(operation, reference, policy.evaluate(reference), image)
        if not pulled_first:
            return decide_present_image(policy, operation, image, reference, docker)
        # A swarm task pulls the name itself, later: judged as a pull of a digest, never of a tag.
        judged = policy if reference.digest else policy.judged_with(SERVICE_TAG)
        return decision_for(operation, reference, judged.evaluate(reference), image)
    # An ID, or a name that dockerd may also take as a short ID: it tries the
    # name first, then the ID prefix, when it acts, which may be after a
    # name was removed. Every image the text could resolve to must be allowed.
    try:
        images = docker.images_for(image)
    except ImagePolicyError as error:
        return Decision(False, operation, image, image, "image-id", f"cannot resolve the image: {error}", named=image)
    if not images and image.startswith("sha256:"):
        return Decision(False, operation, image, image, "image-id", "no such image", named=image)
    decisions = [decide_local_image(policy, operation, image, local) for local in images]
    if not images or (pulled_first and not IMAGE_ID_RE.fullmatch(image) and not DIGEST_RE.fullmatch(image)):
        # No such image: dockerd answers 404 and the CLI pulls the name; or the name is pulled first.
        reference = parse_reference(image)
        decisions.insert(0, decision_for(operation, reference, policy.evaluate(reference), image))
    return first_denial(decisions)


def decide_present_image(policy: Policy, operation: Operation, image: str, reference: Reference,
                         docker: Docker | None) -> Decision:
    """A name in a signed scope runs the image present under it: judged by that image's own signature."""
    try:
        images = present_images(docker, image)
    except ImagePolicyError as error:
        return decision_for(operation, reference, policy.judged_with(cannot_look_up(error)).evaluate(reference), image)
    if not images:
        return decision_for(operation, reference, policy.judged_with(NOT_PRESENT).evaluate(reference), image)
    return first_denial([decision_for(operation, reference, policy.of_image(local).evaluate(reference), image)
                         for local in images])


def present_images(docker: Docker | None, text: str) -> list[LocalImage]:
    """The images dockerd could take text to mean now; ImagePolicyError when the daemon cannot be asked."""
    if docker is None:
        raise ImagePolicyError("no Docker API to ask")
    return docker.images_for(text)


# A signed scope judges the image present under a name: where there is none, dockerd answers 404 and
# the docker CLI would pull and ask again; the pull is where a signature is checked first.
NOT_PRESENT = OfflineSignatures(SignatureVerdict(False, "no such image on this host: pull it first (docker pull),"
                                                        " which checks its signature"))


SERVICE_TAG = OfflineSignatures(SignatureVerdict(False, "a swarm worker resolves a service's tag itself, later: in a"
                                                        " signed scope a service names its image by digest"
                                                        " (docker service create pins it, unless"
                                                        " --no-resolve-image)"))


def cannot_look_up(error: ImagePolicyError) -> Signatures:
    return OfflineSignatures(SignatureVerdict(False, f"cannot look up the image present under the name: {error}"))


def decide_local_image(policy: Policy, operation: Operation, image: str, local: LocalImage) -> Decision:
    """A present image is allowed when one of its names is."""
    denial = None
    judging = policy.of_image(local)
    for name in local.names:
        reference = parse_reference(name)
        verdict = judging.evaluate(reference)
        if verdict.allow:
            return Decision(True, operation, reference.canonical, image, verdict.rule,
                            f"{verdict.reason} for its name {reference.familiar}", named=image,
                            decided_by=verdict.decided_by)
        denial = denial or Decision(False, operation, reference.canonical, image, verdict.rule,
                                    f"none of its names is allowed ({verdict.reason} for {reference.familiar})",
                                    named=image)
    return denial or Decision(False, operation, local.id, image, "image-id",
                              f"image {local.id[:19]} has no repository name or digest the policy could allow",
                              named=image)


# --------------------------------------------------------------------------
# Registry client and cosign signatures
# --------------------------------------------------------------------------

# The manifests dockerd pulls: distribution's schema 2 and OCI's, single images and multi-platform lists.
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
MANIFEST_TYPES = (OCI_INDEX, OCI_MANIFEST, "application/vnd.docker.distribution.manifest.list.v2+json", DOCKER_MANIFEST)
# dockerd refuses manifests over 4 MiB; a simple-signing payload or a Sigstore
# bundle is a few kilobytes, a token answer a few more.
MAX_MANIFEST = 4 * 1024 * 1024
MAX_SIGNATURE_BLOB = 1024 * 1024
# cosign reads at most 1000 signatures of an image (pkg/oci/remote, maxLayers): no more are fetched.
MAX_SIGNATURES = 1000
# Each registry connection, while dockerd waits for the plugin's answer.
REGISTRY_TIMEOUT = 5.0
# Blobs are commonly redirected to storage on another host (S3, a CDN): a short chain is normal.
MAX_REDIRECTS = 5
REDIRECTS = frozenset({HTTPStatus.MOVED_PERMANENTLY, HTTPStatus.FOUND, HTTPStatus.SEE_OTHER,
                       HTTPStatus.TEMPORARY_REDIRECT, HTTPStatus.PERMANENT_REDIRECT})
# dockerd talks plain HTTP to registries in these networks unless told otherwise
# (moby registry/config.go); GET /info shows the daemon's own list.
DEFAULT_INSECURE_NETWORKS = ("127.0.0.0/8", "::1/128")
# Docker Hub's API host; the credentials file names Hub by its v1 index URL.
HUB_API_HOST = "registry-1.docker.io"
HUB_CREDENTIAL_NAMES = frozenset({"index.docker.io", "docker.io", "registry-1.docker.io"})
# A bearer token without expires_in lasts 60 seconds (distribution's token spec).
TOKEN_LIFETIME = 60.0
# Verdicts remembered per repository, digest and key set: a valid signature for
# as long as it stays in the cache, a missing or bad one briefly, as it may be
# signed (or re-pushed) any moment. An unreachable registry is never remembered.
VERDICT_CACHE_ENTRIES = 1024
NEGATIVE_VERDICT_SECONDS = 30.0

# cosign's formats (pkg/oci/static, pkg/cosign/bundle; sigstore's protobuf-specs and DSSE).
COSIGN_SIGNATURE_ANNOTATION = "dev.cosignproject.cosign/signature"
SIGSTORE_BUNDLE_TYPE = "application/vnd.dev.sigstore.bundle"   # a prefix: v0.3+json and later
IN_TOTO_PAYLOAD_TYPE = "application/vnd.in-toto+json"
IN_TOTO_STATEMENTS = frozenset({"https://in-toto.io/Statement/v1", "https://in-toto.io/Statement/v0.1"})
# Bearer realm="https://auth.example.com/token",service="registry.example.com"
WWW_AUTHENTICATE_PARAMETER = re.compile(r'(\w+)="([^"]*)"')
# The digests of signature manifests and blobs: what cosign writes, and what the client can check.
SHA256_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
# A whole signature check, however many signatures an image has, while dockerd waits.
SIGNATURE_CHECK_TIMEOUT = 20.0
# dockerd's registry settings and image store (GET /info) are read again after this long: a restarted
# dockerd may have others, and the plugin outlives it.
DAEMON_SETTINGS_SECONDS = 300.0
# The containerd image store names an image by the digest of the manifest or index it was pulled by;
# the classic store by its config's digest. GET /info's DriverStatus says which store dockerd runs.
CONTAINERD_STORE = ["driver-type", "io.containerd.snapshotter.v1"]
# An image present is checked against at most this many digests it records for one repository
# (the classic store keeps one per digest it was pulled by) and this many manifests of an index.
MAX_RECORDED_DIGESTS = 8
MAX_INDEX_MANIFESTS = 64


class RegistryError(ImagePolicyError):
    """A registry answer the plugin cannot use; the message never carries credentials."""


class RegistryUnreachable(RegistryError):
    """No answer from a registry: a network error, a timeout, a TLS failure."""


@dataclass(frozen=True)
class RegistrySettings:
    """Which registries dockerd reaches over plain HTTP, and Docker Hub's mirrors: its RegistryConfig (GET /info)."""

    insecure_networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = tuple(
        ipaddress.ip_network(network) for network in DEFAULT_INSECURE_NETWORKS)
    index_security: MappingProxyType[str, bool] = dataclasses.field(   # "host[:port]" -> Secure
        default_factory=lambda: MappingProxyType({}))
    mirrors: tuple[str, ...] = ()   # Docker Hub's mirrors, as URLs: https://mirror.example.com

    @classmethod
    def from_info(cls, info: Any) -> RegistrySettings:
        """The settings in dockerd's GET /info answer; ImagePolicyError when it has none that can be read."""
        try:
            config = info["RegistryConfig"]
            networks = tuple(ipaddress.ip_network(network) for network in config.get("InsecureRegistryCIDRs") or [])
            security = {name: bool(index["Secure"]) for name, index in (config.get("IndexConfigs") or {}).items()}
            mirrors = tuple(str(mirror) for mirror in config.get("Mirrors") or [])
            if not all(urlsplit(mirror).scheme in ("https", "http") and urlsplit(mirror).hostname for mirror in mirrors):
                raise ValueError(f"a mirror that is not an HTTP(S) URL in {mirrors}")
        except (KeyError, TypeError, AttributeError, ValueError) as error:
            raise ImagePolicyError(f"unexpected RegistryConfig from the Docker API: {error!r}") from None
        return cls(networks, MappingProxyType(security), mirrors)

    def insecure(self, domain: str) -> bool:
        """Whether dockerd would reach this registry over plain HTTP (moby's isSecureIndex)."""
        if domain in self.index_security:
            return not self.index_security[domain]
        host = _split_host(domain)[0]
        try:
            addresses = {ipaddress.ip_address(host)}
        except ValueError:
            try:
                addresses = {ipaddress.ip_address(found[4][0].split("%")[0])
                             for found in socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)}
            except OSError:
                return False   # dockerd, too, keeps HTTPS for a name it cannot resolve
        return any(address in network for address in addresses for network in self.insecure_networks)


def _split_host(domain: str) -> tuple[str, int | None]:
    """("localhost", 5000) for localhost:5000, ("::1", 5000) for [::1]:5000."""
    host, colon, port = domain.rpartition(":")
    if not colon or not port.isdigit() or (host.count(":") and not host.endswith("]")):
        host, port = domain, ""
    return host.strip("[]"), int(port) if port else None


class DuplicateKey(ValueError):
    pass


def _reject_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """An object hook for JSON that must name each key once (signed payloads, credentials)."""
    keys = [key for key, _ in pairs]
    for key in keys:
        if keys.count(key) > 1:
            raise DuplicateKey(key)
    return dict(pairs)


def load_credentials(path: str) -> MappingProxyType[str, tuple[str, str]]:
    """Registry credentials from a docker config.json-format file: registry -> (user, password)."""
    try:
        with open(path, encoding="utf-8") as file:
            document = json.load(file, object_pairs_hook=_reject_duplicate_keys)
    except OSError as error:
        raise ConfigError(path, "", f"cannot read the registry credentials: {error.strerror}") from None
    except DuplicateKey as error:
        raise ConfigError(path, f"key {error}", "appears twice") from None
    except ValueError as error:
        raise ConfigError(path, "", f"not JSON: {error}") from None
    if not isinstance(document, dict) or not isinstance(document.get("auths", {}), dict):
        raise ConfigError(path, "auths", "expected an object of registries, as in docker's config.json")
    for helper in ("credsStore", "credHelpers"):
        if document.get(helper):
            raise ConfigError(path, helper, "credential helpers are not run by the plugin; "
                                            "write the registry's credentials under auths")
    credentials = {}
    for name, entry in document.get("auths", {}).items():
        where = f"auths.{name}"
        if not isinstance(entry, dict):
            raise ConfigError(path, where, "expected an object with auth, or username and password")
        if entry.get("identitytoken"):
            raise ConfigError(path, where, "identity tokens are not supported; use a username and a password or access token")
        if "auth" in entry:
            try:
                user, colon, password = base64.b64decode(entry["auth"], validate=True).decode().partition(":")
            except (binascii.Error, UnicodeDecodeError, TypeError, ValueError):
                colon = ""
            if not colon:
                raise ConfigError(path, f"{where}.auth", "not base64 of user:password") from None
        else:
            if not isinstance(entry.get("username"), str) or not isinstance(entry.get("password"), str):
                raise ConfigError(path, where, "expected auth, or username and password")
            user, password = entry["username"], entry["password"]
        host = re.sub(r"^[a-z]+://", "", name).split("/")[0].lower()
        credentials["docker.io" if host in HUB_CREDENTIAL_NAMES else host] = (user, password)
    return MappingProxyType(credentials)


@dataclass(frozen=True)
class Fetched:
    """A manifest or blob as received, with the digest of the bytes received."""

    media_type: str
    content: bytes

    @property
    def digest(self) -> str:
        return "sha256:" + sha256(self.content).hexdigest()


class VerdictMemory:
    """Signature verdicts shared by the plugin's threads: bounded, the oldest forgotten first."""

    def __init__(self, entries: int = VERDICT_CACHE_ENTRIES) -> None:
        self.entries = entries
        self.lock = threading.Lock()
        self.verdicts: dict[Any, tuple[SignatureVerdict, float]] = {}

    def get(self, key: Any) -> SignatureVerdict | None:
        with self.lock:
            verdict, expiry = self.verdicts.get(key, (None, 0.0))
        return verdict if expiry > time.monotonic() else None

    def put(self, key: Any, verdict: SignatureVerdict, lifetime: float | None) -> None:
        expiry = float("inf") if lifetime is None else time.monotonic() + lifetime
        with self.lock:
            self.verdicts.pop(key, None)
            self.verdicts[key] = (verdict, expiry)
            while len(self.verdicts) > self.entries:
                del self.verdicts[next(iter(self.verdicts))]


class RegistryClient:
    """Reads manifests and blobs of one registry API (distribution's /v2/), as dockerd would reach them."""

    def __init__(self, settings: RegistrySettings = RegistrySettings(),
                 credentials: MappingProxyType[str, tuple[str, str]] = MappingProxyType({}),
                 timeout: float = REGISTRY_TIMEOUT) -> None:
        self.settings, self.credentials, self.timeout = settings, credentials, timeout
        # Looked up once per host (a name is resolved to see whether it is in an insecure network).
        self.insecure = functools.lru_cache(maxsize=VERDICT_CACHE_ENTRIES)(settings.insecure)
        self.plain_http: set[str] = set()   # insecure registries that answered over HTTP: asked that way first
        self.tls = ssl.create_default_context()
        self.tls_unverified = ssl.create_default_context()   # dockerd's insecure registries: not verified
        self.tls_unverified.check_hostname = False
        self.tls_unverified.verify_mode = ssl.CERT_NONE
        self.lock = threading.Lock()
        self.tokens: dict[tuple[str, str], tuple[str, float]] = {}   # (host, repository) -> header, expiry
        self.verdicts = VerdictMemory()

    def manifest(self, reference: Reference, name: str, accept: tuple[str, ...] = MANIFEST_TYPES) -> Fetched | None:
        """The manifest at a tag or digest (None when the registry has none); a digest is checked."""
        fetched = self.get(reference, f"manifests/{name}", MAX_MANIFEST, accept)
        if fetched is not None and ":" in name and fetched.digest != name:   # a digest (tags have no colon)
            raise RegistryError(f"{reference.domain} answered {reference.path}@{name} with other content")
        return fetched

    def blob(self, reference: Reference, digest: str, limit: int = MAX_SIGNATURE_BLOB) -> bytes:
        """A blob, checked against its digest."""
        fetched = self.get(reference, f"blobs/{digest}", limit)
        if fetched is None:
            raise RegistryError(f"{reference.domain} has no blob {digest} in {reference.path}")
        if fetched.digest != digest:
            raise RegistryError(f"{reference.domain} answered blob {digest} of {reference.path} with other content")
        return fetched.content

    def get(self, reference: Reference, resource: str, limit: int, accept: tuple[str, ...] = (),
            absent: frozenset[int] = frozenset({HTTPStatus.NOT_FOUND})) -> Fetched | None:
        """GET /v2/<repository>/<resource> (None for 404, or another status in absent).

        Docker Hub's mirrors are asked first, as dockerd asks them; the next
        endpoint only when one cannot be reached.
        """
        endpoints = self.endpoints(reference.domain)
        for index, (scheme, host) in enumerate(endpoints):
            try:
                status, answer, body = self.get_from(scheme, host, reference, resource, limit, accept)
                break
            except RegistryUnreachable:
                if index == len(endpoints) - 1:
                    raise
        if status in absent:
            return None
        if status != HTTPStatus.OK:
            raise RegistryError(f"{host} answered GET /v2/{reference.path}/{resource} with HTTP {status}")
        return Fetched(answer.get("Content-Type", "").split(";")[0].strip(), body)

    def endpoints(self, domain: str) -> tuple[tuple[str | None, str], ...]:
        """(scheme, or None for dockerd's choice; host) of each API endpoint of a registry, in order."""
        if domain != "docker.io":
            return ((None, domain),)
        mirrors = tuple((mirror.scheme, mirror.netloc) for mirror in map(urlsplit, self.settings.mirrors))
        return mirrors + ((None, HUB_API_HOST),)

    def get_from(self, scheme: str | None, host: str, reference: Reference, resource: str, limit: int,
                 accept: tuple[str, ...]) -> tuple[int, http.client.HTTPMessage, bytes]:
        """One endpoint's answer, with a token when it asks for one (tokens are kept per host and repository)."""
        path = f"/v2/{reference.path}/{resource}"
        headers = {"Accept": ", ".join(accept)} if accept else {}
        with self.lock:
            token, expiry = self.tokens.get((host, reference.path), ("", 0.0))
        if token and expiry > time.monotonic():
            headers["Authorization"] = token
        status, answer, body = self.request(host, path, headers, limit, scheme)
        if status == HTTPStatus.UNAUTHORIZED:
            headers["Authorization"] = self.authorize(host, reference, answer.get("WWW-Authenticate", ""))
            status, answer, body = self.request(host, path, headers, limit, scheme)
        return status, answer, body

    def authorize(self, host: str, reference: Reference, challenge: str) -> str:
        """The Authorization header a 401's challenge asks for (distribution's token flow)."""
        scheme, _, parameters = challenge.partition(" ")
        credentials = self.credentials.get(reference.domain)
        basic = "Basic " + base64.b64encode(":".join(credentials).encode()).decode() if credentials else ""
        if scheme.lower() == "basic" and basic:
            return basic
        values = dict(WWW_AUTHENTICATE_PARAMETER.findall(parameters))
        if scheme.lower() != "bearer" or "realm" not in values:
            raise RegistryError(f"{host} asks for credentials the plugin does not have")
        realm = urlsplit(values["realm"])
        if realm.scheme not in ("https", "http") or not realm.hostname or realm.username or (
                realm.scheme == "http" and not self.insecure(realm.netloc)):
            raise RegistryError(f"{host} names a token service the plugin will not use")
        query = urlencode({"service": values.get("service", ""), "scope": f"repository:{reference.path}:pull"})
        path = f"{realm.path or '/'}?{realm.query + '&' if realm.query else ''}{query}"
        status, _, body = self.request(realm.netloc, path, {"Authorization": basic} if basic else {},
                                       MAX_SIGNATURE_BLOB, realm.scheme)
        try:
            if status != HTTPStatus.OK:
                raise ValueError(f"HTTP {status}")
            answer = json.loads(body)
            token = answer.get("token") or answer.get("access_token")
            if not isinstance(token, str) or not token:
                raise ValueError("no token")
            lifetime = float(answer.get("expires_in") or TOKEN_LIFETIME)
        except (ValueError, TypeError, AttributeError, RecursionError) as error:
            raise RegistryError(f"the token service of {host} gave no token ({error})") from None
        header = f"Bearer {token}"
        with self.lock:
            self.tokens[(host, reference.path)] = (header, time.monotonic() + lifetime - 5)
            if len(self.tokens) > VERDICT_CACHE_ENTRIES:
                self.tokens.pop(next(iter(self.tokens)))
        return header

    def request(self, host: str, path: str, headers: dict[str, str], limit: int,
                scheme: str | None = None) -> tuple[int, http.client.HTTPMessage, bytes]:
        """One GET, following redirects; Authorization goes to the host it was meant for and no other.

        Without a scheme, HTTPS; an insecure registry is then asked over plain
        HTTP when HTTPS fails, as dockerd asks it.
        """
        schemes = (scheme,) if scheme else ("https", "http") if self.insecure(host) else ("https",)
        if host in self.plain_http:
            schemes = schemes[::-1]
        for index, current in enumerate(schemes):
            try:
                answer = self._follow(current, host, path, headers, limit)
                if current == "http" and not scheme:
                    self.plain_http.add(host)
                return answer
            except (OSError, http.client.HTTPException) as error:
                if index == len(schemes) - 1:
                    raise RegistryUnreachable(f"{host}: {_network_error(error)}") from None
        raise AssertionError("unreachable")

    def _follow(self, scheme: str, host: str, path: str, headers: dict[str, str],
                limit: int) -> tuple[int, http.client.HTTPMessage, bytes]:
        origin = (scheme, host)
        for _ in range(MAX_REDIRECTS + 1):
            sent = headers if (scheme, host) == origin else {k: v for k, v in headers.items() if k != "Authorization"}
            connection: http.client.HTTPConnection
            if scheme == "https":
                connection = http.client.HTTPSConnection(
                    host, timeout=self.timeout, context=self.tls_unverified if self.insecure(host) else self.tls)
            else:
                connection = http.client.HTTPConnection(host, timeout=self.timeout)
            try:
                connection.request("GET", path, headers={"User-Agent": f"{PLUGIN_NAME}/{__version__}", **sent})
                response = connection.getresponse()
                if response.status not in REDIRECTS:
                    return response.status, response.headers, self._body(response, host, path, limit)
                location = urlsplit(urljoin(f"{scheme}://{host}{path}", response.getheader("Location") or ""))
            finally:
                connection.close()
            if location.scheme not in ("https", "http") or not location.hostname or location.username or (
                    location.scheme == "http" and scheme == "https" and not self.insecure(location.netloc)):
                raise RegistryError(f"{host} redirected GET {path.split('?')[0]} where the plugin will not follow")
            scheme, host = location.scheme, location.netloc
            path = location.path + (f"?{location.query}" if location.query else "")
        raise RegistryError(f"more than {MAX_REDIRECTS} redirects from {origin[1]}")

    def _body(self, response: http.client.HTTPResponse, host: str, path: str, limit: int) -> bytes:
        """At most limit bytes, within the timeout as a whole: a registry that trickles is as good as none."""
        body = bytearray()
        until = time.monotonic() + self.timeout
        while chunk := response.read1(65536):
            body += chunk
            if len(body) > limit:
                raise RegistryError(f"{host} answered GET {path.split('?')[0]} with more than {limit} bytes")
            if time.monotonic() > until:
                raise TimeoutError(f"{host} sent GET {path.split('?')[0]} too slowly")
        return bytes(body)


def _network_error(error: Exception) -> str:
    """What went wrong on the network, in words fit for a message (no URLs, no headers)."""
    if isinstance(error, ssl.SSLCertVerificationError):
        return f"TLS certificate not trusted ({error.verify_message})"
    if isinstance(error, TimeoutError | socket.timeout):
        return "timed out"
    return error.strerror or type(error).__name__ if isinstance(error, OSError) else type(error).__name__


# Why an image has no valid signature by a listed key, from the least to the
# most telling: a verdict names the most telling one any signature shows.
NO_SIGNATURE = "no signature"
OTHER_KEY = "signed by another key"
OTHER_KEY_OR_TAMPERED = "signed by another key, or its payload was altered"   # a .sig names no key: the two look alike
TAMPERED = "payload tampered/invalid signature"
OTHER_DIGEST = "signature for another digest"
FAILURES = (NO_SIGNATURE, OTHER_KEY, OTHER_KEY_OR_TAMPERED, TAMPERED, OTHER_DIGEST)


@dataclass(frozen=True)
class CosignSignature:
    """One signature found for an image, in either of cosign's formats."""

    kind: str            # "cosign signature" (tag sha256-<hex>.sig) or "sigstore bundle" (cosign 3)
    message: bytes       # the bytes signed
    signature: bytes     # DER ECDSA, or b"" when the registry's text was not base64
    key_hint: str        # a bundle's publicKey.hint: base64 of the key's SHA-256; "" for a .sig
    digests: Callable[[], frozenset[str]]   # the image digests the signed payload names; ValueError if unreadable


def _go_field(value: Any, name: str) -> Any:
    """What Go's encoding/json puts in the struct field name; ValueError where it would read another key than we do."""
    if not isinstance(value, dict):
        raise ValueError(f"expected an object holding {name!r}")
    keys = [key for key in value if go_fold(key) == go_fold(name)]
    if len(keys) > 1:
        raise ValueError(f"{name!r} spelled several ways")
    return value[keys[0]] if keys else None


def _signed_json(payload: bytes) -> Any:
    """JSON that names one value per key; ValueError for anything else, deep nesting included."""
    try:
        return json.loads(payload, object_pairs_hook=_reject_duplicate_keys)
    except RecursionError:
        raise ValueError("nested too deeply") from None


def _base64(text: Any) -> bytes:
    """Standard base64 with padding, as Go's base64.StdEncoding reads it; b"" for anything else."""
    try:
        return base64.b64decode(text, validate=True) if isinstance(text, str) else b""
    except (binascii.Error, ValueError):
        return b""


def _simple_signing_digests(payload: bytes) -> frozenset[str]:
    """critical.image.docker-manifest-digest of a simple-signing payload (cosign's SimpleClaimVerifier)."""
    digest = _go_field(_go_field(_go_field(_signed_json(payload), "critical"), "image"), "docker-manifest-digest")
    if not isinstance(digest, str):
        raise ValueError("no docker-manifest-digest")
    return frozenset({digest})


def _in_toto_digests(payload: bytes) -> frozenset[str]:
    """The sha256 digests of an in-toto statement's subjects (cosign's IntotoSubjectClaimVerifier)."""
    statement = _signed_json(payload)
    if _go_field(statement, "_type") not in IN_TOTO_STATEMENTS:
        raise ValueError("not an in-toto statement")
    subjects = _go_field(statement, "subject")
    if not isinstance(subjects, list) or not all(isinstance(subject, dict) for subject in subjects):
        raise ValueError("no list of subjects")
    digests = (_go_field(_go_field(subject, "digest"), "sha256") for subject in subjects)
    return frozenset(f"sha256:{digest}" for digest in digests if isinstance(digest, str))


def _dsse_message(payload_type: str, payload: bytes) -> bytes:
    """DSSE's pre-authentication encoding: what a DSSE signature covers."""
    kind = payload_type.encode()
    return b"DSSEv1 %d %s %d %s" % (len(kind), kind, len(payload), payload)


def _manifest(fetched: Fetched, reference: Reference) -> dict[str, Any]:
    try:
        manifest = _signed_json(fetched.content)
        if not isinstance(manifest, dict):
            raise ValueError("not an object")
        descriptors = manifest.get("layers", manifest.get("manifests", []))
        if not isinstance(descriptors, list) or not all(
                isinstance(d, dict) and isinstance(d.get("digest"), str) and SHA256_DIGEST.fullmatch(d["digest"])
                for d in descriptors):
            raise ValueError("descriptors without a sha256 digest")
    except ValueError as error:
        raise RegistryError(f"{reference.domain} has an unreadable manifest {fetched.digest} "
                            f"in {reference.path}: {error}") from None
    return manifest


def classic_signatures(client: RegistryClient, reference: Reference, digest: str,
                       deadline: float = float("inf")) -> list[CosignSignature]:
    """cosign's signatures at the tag sha256-<hex>.sig: one simple-signing payload per layer."""
    fetched = client.manifest(reference, digest.replace(":", "-") + ".sig", (OCI_MANIFEST, DOCKER_MANIFEST))
    if fetched is None:
        return []
    found = []
    for layer in _manifest(fetched, reference).get("layers", [])[:MAX_SIGNATURES]:
        annotations = layer.get("annotations")
        if not isinstance(annotations, dict) or COSIGN_SIGNATURE_ANNOTATION not in annotations:
            continue
        _in_time(deadline, reference)
        payload = client.blob(reference, layer["digest"])
        found.append(CosignSignature("cosign signature", payload, _base64(annotations[COSIGN_SIGNATURE_ANNOTATION]),
                                     "", functools.partial(_simple_signing_digests, payload)))
    return found


def bundle_signatures(client: RegistryClient, reference: Reference, digest: str,
                      deadline: float = float("inf")) -> list[CosignSignature]:
    """cosign 3's Sigstore bundles: referrers of the digest (or the fallback tag sha256-<hex>), one bundle each."""
    index = client.get(reference, f"referrers/{digest}", MAX_MANIFEST, (OCI_INDEX,),
                       absent=frozenset({HTTPStatus.NOT_FOUND, HTTPStatus.BAD_REQUEST}))
    if index is None:   # a registry without the referrers API (OCI distribution-spec 1.1's fallback)
        index = client.manifest(reference, digest.replace(":", "-"), (OCI_INDEX,))
    if index is None:
        return []
    found = []
    for descriptor in _manifest(index, reference).get("manifests", [])[:MAX_SIGNATURES]:
        _in_time(deadline, reference)
        fetched = client.manifest(reference, descriptor["digest"], (OCI_MANIFEST,))
        layers = _manifest(fetched, reference).get("layers", []) if fetched is not None else []
        if len(layers) != 1 or not str(layers[0].get("mediaType", "")).startswith(SIGSTORE_BUNDLE_TYPE):
            continue   # another kind of referrer (an SBOM, a Notation signature): not cosign's to judge
        found.extend(_bundle_signatures(client.blob(reference, layers[0]["digest"])))
    return found


def _in_time(deadline: float, reference: Reference) -> None:
    if time.monotonic() > deadline:
        raise RegistryUnreachable(f"{reference.domain}: reading the signatures took more than {SIGNATURE_CHECK_TIMEOUT:g} s")


def _bundle_signatures(content: bytes) -> list[CosignSignature]:
    """The DSSE signatures of one bundle; a bundle that is not one becomes a signature that fails."""
    try:
        bundle = _signed_json(content)
        hint = bundle
        for name in ("verificationMaterial", "publicKey", "hint"):   # absent from keyless bundles
            hint = _go_field(hint, name) if hint is not None else None
        envelope = _go_field(bundle, "dsseEnvelope")
        payload_type = _go_field(envelope, "payloadType")
        payload = _base64(_go_field(envelope, "payload"))
        signatures = _go_field(envelope, "signatures")
        if payload_type != IN_TOTO_PAYLOAD_TYPE or not payload or not isinstance(signatures, list) or not signatures:
            raise ValueError("not a DSSE envelope of an in-toto statement")
        message = _dsse_message(payload_type, payload)
        return [CosignSignature("sigstore bundle", message, _base64(_go_field(signature, "sig")),
                                hint if isinstance(hint, str) else "", functools.partial(_in_toto_digests, payload))
                for signature in signatures]
    except ValueError:
        return [CosignSignature("sigstore bundle", content, b"", "", frozenset)]


def judge_signature(signature: CosignSignature, digest: str, keys: tuple[PublicKey, ...]) -> str:
    """The check this signature fails for digest, or "" when a listed key signed it for digest."""
    for key in keys:
        if key.verify(signature.message, signature.signature):
            try:
                return "" if digest in signature.digests() else OTHER_DIGEST
            except ValueError:   # signed, but not a payload cosign would read: another tool's, or a bug
                return TAMPERED
    if not signature.signature or der_signature(signature.signature) is None:
        return TAMPERED
    if signature.key_hint:
        hints = {base64.b64encode(sha256(key.der).digest()).decode() for key in keys}
        return TAMPERED if signature.key_hint in hints else OTHER_KEY
    return OTHER_KEY_OR_TAMPERED


def verify_image(client: RegistryClient, reference: Reference, keys: tuple[PublicKey, ...]) -> SignatureVerdict:
    """Whether a cosign signature by one of keys covers the reference's digest, in either format.

    Remembered per repository, digest and key set (see VERDICT_CACHE_ENTRIES).
    """
    if not reference.digest or not reference.digest.startswith("sha256:") or not keys:
        raise ImagePolicyError(f"a signature check needs a sha256 digest and a key, not {reference.canonical!r}")
    memory = (reference.domain, reference.path, reference.digest, frozenset(key.der for key in keys))
    remembered = client.verdicts.get(memory)
    if remembered is not None:
        return remembered
    deadline = time.monotonic() + SIGNATURE_CHECK_TIMEOUT
    try:
        signatures = (classic_signatures(client, reference, reference.digest, deadline)
                      + bundle_signatures(client, reference, reference.digest, deadline))
    except RegistryError as error:
        return SignatureVerdict(False, f"registry unreachable: {error}" if isinstance(error, RegistryUnreachable)
                                else f"registry answer unusable: {error}")
    failures = []
    for signature in signatures:
        failure = judge_signature(signature, reference.digest, keys)
        if not failure:
            verdict = SignatureVerdict(True, f"signed ({signature.kind})")
            client.verdicts.put(memory, verdict, None)
            return verdict
        failures.append(failure)
    verdict = SignatureVerdict(False, max(failures, key=FAILURES.index, default=NO_SIGNATURE))
    client.verdicts.put(memory, verdict, NEGATIVE_VERDICT_SECONDS)
    return verdict


def resolve_tag(client: RegistryClient, reference: Reference) -> str:
    """The digest the registry serves for a tag now: the SHA-256 of the manifest received."""
    fetched = client.manifest(reference, reference.tag or "latest")
    if fetched is None:
        raise RegistryError(f"{reference.repository}:{reference.tag or 'latest'} not found at the registry")
    return fetched.digest


class RegistrySignatures(Signatures):
    """Signatures as the daemon checks them: at the registry as dockerd reaches it (its mirrors and insecure
    registries, from GET /info), with the credentials of --registry-auth."""

    def __init__(self, docker: DockerAPI | None,
                 credentials: MappingProxyType[str, tuple[str, str]] = MappingProxyType({})) -> None:
        self.docker, self.credentials = docker, credentials
        self.lock = threading.Lock()
        self.settings: tuple[RegistryClient, bool, float] | None = None   # client, containerd store, read at
        self.contents: dict[tuple[str, str, str], frozenset[str]] = {}   # the image IDs a digest names

    def daemon(self) -> tuple[RegistryClient, bool]:
        """The registry client for dockerd's settings, and whether it runs the containerd image store."""
        with self.lock:
            if self.settings and time.monotonic() - self.settings[2] < DAEMON_SETTINGS_SECONDS:
                return self.settings[0], self.settings[1]
        info = self.docker.get("/info") if self.docker else {}
        settings = RegistrySettings.from_info(info) if self.docker else RegistrySettings()
        containerd = CONTAINERD_STORE in (info.get("DriverStatus") or [])
        with self.lock:
            kept = self.settings and self.settings[0].settings == settings   # keeps its tokens and verdicts
            client = self.settings[0] if kept else RegistryClient(settings, self.credentials)   # type: ignore[index]
            self.settings = (client, containerd, time.monotonic())
        return client, containerd

    def check(self, reference: Reference, keys: tuple[PublicKey, ...]) -> SignatureVerdict:
        """A pull's: the digest pulled, or the digest the registry serves for the tag now."""
        resolved = ""
        try:
            client, _ = self.daemon()
            if not reference.digest:
                resolved = resolve_tag(client, reference)
                reference = dataclasses.replace(reference, digest=resolved)
            verdict = verify_image(client, reference, keys)
        except RegistryUnreachable as error:
            return SignatureVerdict(False, f"registry unreachable: {error}")
        except ImagePolicyError as error:
            return SignatureVerdict(False, str(error))
        tag = f"tag {reference.tag or 'latest'} is " if resolved else ""
        return SignatureVerdict(verdict.ok, f"{verdict.reason} ({tag}{reference.digest})")

    def of_image(self, local: LocalImage) -> Signatures:
        return PresentImage(self, local)

    def names_image(self, client: RegistryClient, reference: Reference, containerd: bool, image_id: str) -> bool:
        """Whether the content at reference's digest is the image image_id (an index: any of its images)."""
        if containerd:
            return image_id == reference.digest
        key = (reference.domain, reference.path, str(reference.digest))
        with self.lock:
            ids = self.contents.get(key)
        if ids is None:   # what a digest names never changes: remembered
            ids = frozenset(_config_digests(client, reference))
            with self.lock:
                self.contents[key] = ids
                while len(self.contents) > VERDICT_CACHE_ENTRIES:
                    del self.contents[next(iter(self.contents))]
        return image_id in ids


def _config_digests(client: RegistryClient, reference: Reference) -> list[str]:
    """The config digests (the classic store's image IDs) of the manifest at reference's digest, or of each
    manifest of the index there: a signature on an index covers every manifest it names."""
    fetched = client.manifest(reference, str(reference.digest))
    if fetched is None:
        raise RegistryError(f"{reference.domain} no longer has {reference.path}@{reference.digest}")
    manifest = _manifest(fetched, reference)
    manifests = [manifest]
    for descriptor in manifest.get("manifests", [])[:MAX_INDEX_MANIFESTS] if "manifests" in manifest else ():
        child = client.manifest(reference, descriptor["digest"], (OCI_MANIFEST, DOCKER_MANIFEST))
        if child is not None:
            manifests.append(_manifest(child, reference))
    configs = [m.get("config") for m in manifests]
    return [config["digest"] for config in configs if isinstance(config, dict) and isinstance(config.get("digest"), str)]


def _usual_repository(reference: Reference) -> str:
    return (reference.alias or reference).repository


@dataclass(frozen=True)
class PresentImage(Signatures):
    """An image on the host: signed when a digest it was pulled by from the repository judged is signed, and
    names this very image (a pulled tag may have moved since, a name may be put on other content)."""

    registry: RegistrySignatures
    local: LocalImage

    def check(self, reference: Reference, keys: tuple[PublicKey, ...]) -> SignatureVerdict:
        image = self.local.id.removeprefix("sha256:")[:12]
        usual = (reference.alias or reference).repository
        digests = sorted({name.partition("@")[2] for name in self.local.names
                          if "@" in name and _usual_repository(parse_reference(name)) == usual})
        if not digests:
            return SignatureVerdict(False, f"image {image} was not pulled from {reference.repository} (no digest"
                                           " from there: it was built, loaded, imported, committed or tagged from"
                                           " another repository)")
        failures = []
        try:
            client, containerd = self.registry.daemon()
            for digest in digests[:MAX_RECORDED_DIGESTS]:
                pulled = dataclasses.replace(reference, tag=None, digest=digest)
                verdict = verify_image(client, pulled, keys)
                if not verdict.ok:
                    failures.append(f"{verdict.reason} ({digest}, the digest image {image} was pulled by)")
                elif not self.registry.names_image(client, pulled, containerd, self.local.id):
                    failures.append(f"image {image} is not the content of {digest}, the signed digest it records")
                else:
                    return SignatureVerdict(True, f"{verdict.reason} ({digest}, the digest image {image} was"
                                                  " pulled by)")
        except RegistryUnreachable as error:
            failures.append(f"registry unreachable: {error}")
        except ImagePolicyError as error:
            failures.append(str(error))
        return SignatureVerdict(False, "; ".join(failures))


# --------------------------------------------------------------------------
# Decision log and metrics
# --------------------------------------------------------------------------

def _now() -> str:
    return _format_time(int(time.time()))


@functools.lru_cache(maxsize=1)
def _format_time(second: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(second))


LOG_LEVELS = MappingProxyType({"debug": 10, "info": 20, "warning": 30, "error": 40})
# sd-daemon(3) priorities by level, and by decision: a deny is a notice.
SYSLOG_PRIORITIES = MappingProxyType({"debug": "<7>", "info": "<6>", "warning": "<4>", "error": "<3>",
                                      "allow": "<6>", "would-deny": "<5>", "deny": "<5>"})
# Which decisions the decision log keeps, apart from --log-level.
DECISION_LOGGING = ("all", "denies", "none")


def stderr_is_journal() -> bool:
    """Whether stderr is connected to journald (systemd sets JOURNAL_STREAM to its device:inode)."""
    stream = os.environ.get("JOURNAL_STREAM", "")
    try:
        status = os.fstat(2)
    except OSError:
        return False
    return stream == f"{status.st_dev}:{status.st_ino}"
LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05, 0.25, 1.0, 5.0)


class Log:
    """One line per event on stderr, for journald; decisions as JSON objects.

    Once buffer() is called, every line is written by a background thread
    only, decisions in batches and events at once: a write on the request path
    would hand the GIL to another thread in the middle of every decision, and
    a stalled journald would stall every request that logs. While stderr does
    not take them, at most MAX_PENDING_BYTES of lines wait; later ones are
    dropped, counted, and the count is logged when stderr takes lines again.
    """

    def __init__(self, level: str = "info", stream: Any = None, decisions: str = "all") -> None:
        self.level = LOG_LEVELS[level]
        self.decisions = decisions   # which decisions are logged: DECISION_LOGGING
        self.stream = stream
        # journald reads a "<N>" prefix as the line's syslog priority, when stderr is the journal.
        self.priorities = SYSLOG_PRIORITIES if stderr_is_journal() else MappingProxyType({})
        self.lock = threading.Lock()      # guards pending and the counts: requests take it, briefly
        self.writing = threading.Lock()   # orders writes; a stalled journald holds only this one
        self.pending: list[str] | None = None
        self.pending_bytes = 0
        self.dropped = 0         # since the last write, for the warning line
        self.dropped_total = 0   # since the start, for the metrics
        self.wake = threading.Event()

    def buffer(self, interval: float) -> None:
        self.pending = []

        def flush_periodically() -> None:
            while True:
                self.wake.wait(interval)
                self.wake.clear()
                self.flush()
        threading.Thread(target=flush_periodically, name="log-flush", daemon=True).start()

    def flush(self, timeout: float = -1) -> None:
        """Write the pending lines; give up after timeout seconds (-1: never) if a write is stalled."""
        if not self.writing.acquire(timeout=timeout):
            return
        try:
            with self.lock:
                pending, dropped = self.pending, self.dropped
                if pending:
                    self.pending, self.pending_bytes, self.dropped = [], 0, 0
            text = "".join(pending or ())
            if dropped:
                text += (f"{self.priorities.get('warning', '')}{PLUGIN_NAME}: warning: {dropped} log lines dropped"
                         " while stderr did not keep up\n")
            self.write(text)
        finally:
            self.writing.release()

    def write(self, text: str) -> None:
        if text:
            with contextlib.suppress(OSError, ValueError):   # stderr gone: nowhere left to report it
                stream = self.stream or sys.stderr
                stream.write(text)
                stream.flush()

    def line(self, text: str, now: bool) -> None:
        """Write a line, or queue it for the flush thread (now: wake it up at once)."""
        if self.pending is None:
            with self.writing:
                self.write(text + "\n")
            return
        size = len(text) + 1 if text.isascii() else len(text.encode(errors="replace")) + 1
        with self.lock:
            if self.pending_bytes + size <= MAX_PENDING_BYTES:
                self.pending.append(text + "\n")
                self.pending_bytes += size
            else:
                self.dropped += 1
                self.dropped_total += 1
        if now:
            self.wake.set()

    def event(self, level: str, text: str) -> None:
        if LOG_LEVELS[level] >= self.level:
            self.line(f"{self.priorities.get(level, '')}{PLUGIN_NAME}: {level}: {text}", now=True)

    def decision(self, decision: Decision, outcome: str, policy: Policy) -> None:
        """One JSON object per decision; never bodies, environment or credentials."""
        if self.decisions == "none" or (self.decisions == "denies" and outcome == "allow"):
            return
        now = _now()
        self.line(f'{self.priorities.get(outcome, "")}{{"time": "{now}", "decision": "{outcome}",'
                  f' "mode": "{policy.mode}", "policy": "{policy.sha256[:12]}", {decision.log_fields}', now=False)


class Metrics:
    """Counters and a latency histogram, served in the Prometheus text format."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.decisions: dict[tuple[str, str], int] = {}
        self.reloads = {"success": 0, "failure": 0}   # reloads only: the first load is none
        self.last_reload = time.time()
        self.last_reload_successful = True
        self.buckets = [0] * (len(LATENCY_BUCKETS) + 1)
        self.latency_sum = 0.0

    def count(self, operation: str, outcome: str, seconds: float) -> None:
        key = (operation, outcome)
        with self.lock:
            self.decisions[key] = self.decisions.get(key, 0) + 1
            self.buckets[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
            self.latency_sum += seconds

    def reloaded(self, success: bool) -> None:
        with self.lock:
            self.reloads["success" if success else "failure"] += 1
            self.last_reload_successful = success
            if success:
                self.last_reload = time.time()

    def render(self, policy: Policy, admin_bind_failures: int, dropped_lines: int) -> str:
        name = "docker_image_policy"
        lines = [f"# HELP {name}_build_info The plugin's version: which hosts of a fleet run which build.",
                 f"# TYPE {name}_build_info gauge",
                 f'{name}_build_info{{version="{__version__}"}} 1',
                 f"# HELP {name}_decisions_total AuthZReq decisions by operation and result.",
                 f"# TYPE {name}_decisions_total counter"]
        with self.lock:
            for (operation, outcome), value in sorted(self.decisions.items()):
                lines.append(f'{name}_decisions_total{{operation="{operation}",decision="{outcome}"}} {value}')
            lines += [f"# HELP {name}_reloads_total Configuration reloads by outcome.",
                      f"# TYPE {name}_reloads_total counter"]
            lines += [f'{name}_reloads_total{{outcome="{k}"}} {v}' for k, v in self.reloads.items()]
            lines += [f"# HELP {name}_last_reload_success_timestamp_seconds When the configuration was last loaded.",
                      f"# TYPE {name}_last_reload_success_timestamp_seconds gauge",
                      f"{name}_last_reload_success_timestamp_seconds {self.last_reload:.3f}",
                      f"# HELP {name}_config_last_reload_successful Whether the last load of the policy file"
                      " succeeded (0 while a broken file waits to be fixed).",
                      f"# TYPE {name}_config_last_reload_successful gauge",
                      f"{name}_config_last_reload_successful {int(self.last_reload_successful)}",
                      f"# HELP {name}_policy_info The policy in force: its file and the SHA-256 of its contents.",
                      f"# TYPE {name}_policy_info gauge",
                      f'{name}_policy_info{{file={json.dumps(policy.path)},sha256="{policy.sha256}",'
                      f'mode="{policy.mode}"}} 1',
                      f"# HELP {name}_rules Rules in the running policy.",
                      f"# TYPE {name}_rules gauge",
                      f'{name}_rules{{list="whitelist"}} {len(policy.whitelist.rules)}',
                      f'{name}_rules{{list="blacklist"}} {len(policy.blacklist.rules)}',
                      f'{name}_rules{{list="scopes"}} {len(policy.scopes.entries)}',
                      f"# HELP {name}_authz_request_seconds Time to decide an AuthZReq.",
                      f"# TYPE {name}_authz_request_seconds histogram"]
            total = 0
            for bound, value in zip(LATENCY_BUCKETS + (float("inf"),), self.buckets):
                total += value
                label = "+Inf" if bound == float("inf") else repr(bound)
                lines.append(f'{name}_authz_request_seconds_bucket{{le="{label}"}} {total}')
            lines += [f"{name}_authz_request_seconds_sum {self.latency_sum:.6f}",
                      f"{name}_authz_request_seconds_count {total}"]
        next_end = policy.scopes.next_end(time.time())
        if next_end != float("inf"):
            lines += [f"# HELP {name}_exception_expiry_seconds Seconds until the next scope entry with \"until\""
                      " ends.", f"# TYPE {name}_exception_expiry_seconds gauge",
                      f"{name}_exception_expiry_seconds {next_end - time.time():.0f}"]
        lines += [f"# HELP {name}_admin_bind_failures_total Failed binds of the admin listener's address (held by"
                  " another process).",
                  f"# TYPE {name}_admin_bind_failures_total counter",
                  f"{name}_admin_bind_failures_total {admin_bind_failures}",
                  f"# HELP {name}_log_lines_dropped_total Log lines dropped while stderr did not take them.",
                  f"# TYPE {name}_log_lines_dropped_total counter",
                  f"{name}_log_lines_dropped_total {dropped_lines}"]
        lines += [f"# HELP {name}_policy_file_drift Whether the policy file on disk differs from the policy in"
                  " force (changed and not reloaded, its reload failed, or it is unreadable).",
                  f"# TYPE {name}_policy_file_drift gauge",
                  f"{name}_policy_file_drift {int(file_sha256(policy.path) != policy.sha256)}"]
        return "\n".join(lines) + "\n"


def file_sha256(path: str) -> str | None:
    """The SHA-256 the policy file on disk would load with (read as load_policy reads it); None if unreadable."""
    try:
        with open(path, encoding="utf-8") as file:
            return sha256(file.read().encode()).hexdigest()
    except (OSError, UnicodeDecodeError):
        return None


# --------------------------------------------------------------------------
# The plugin: policy reference, reloads, AuthZ answers
# --------------------------------------------------------------------------

def _plugin_response(payload: dict[str, Any]) -> bytes:
    body = json.dumps(payload).encode()
    return (b"HTTP/1.1 200 OK\r\nContent-Type: application/vnd.docker.plugins.v1+json\r\n"
            b"Content-Length: %d\r\n\r\n" % len(body)) + body


ACTIVATE_RESPONSE = _plugin_response({"Implements": ["authz"]})
# --health asks the plugin socket, which only root can reach, for the status
# (and the admin listener's address): a process squatting the admin port cannot answer it.
HEALTH_ENDPOINT = "/DockerImagePolicy.Status"
ALLOW_RESPONSE = _plugin_response({"Allow": True, "Msg": "", "Err": ""})


@dataclass(frozen=True, slots=True)
class Answer:
    """What the plugin answers a request body: remembered whole, so that a repeated request costs a lookup."""

    decision: Decision
    outcome: str        # allow, deny or would-deny: the decision log's and the metrics' word
    response: bytes     # the complete HTTP response


class Answers:
    """Answers remembered by request body, shared by the request threads.

    At most CACHE_ENTRIES; when full, the least recently used is forgotten,
    so that the calls a host repeats stay remembered under a flood of
    distinct ones.
    """

    def __init__(self, size: int = CACHE_ENTRIES) -> None:
        self.size = size
        self.lock = threading.Lock()
        self.entries: collections.OrderedDict[bytes, Answer] = collections.OrderedDict()

    def get(self, body: bytes) -> Answer | None:
        with self.lock:
            answer = self.entries.get(body)
            if answer is not None:
                self.entries.move_to_end(body)
            return answer

    def put(self, body: bytes, answer: Answer) -> None:
        with self.lock:
            self.entries[body] = answer
            self.entries.move_to_end(body)
            if len(self.entries) > self.size:
                self.entries.popitem(last=False)

    def __len__(self) -> int:
        with self.lock:
            return len(self.entries)

    def __contains__(self, body: bytes) -> bool:
        return body in self.entries

    def bodies(self) -> list[bytes]:
        """The bodies remembered, least recently used first."""
        with self.lock:
            return list(self.entries)


@dataclass(frozen=True)
class Running:
    """The policy in force and the answers remembered for it: replaced together."""

    policy: Policy
    answers: Answers = dataclasses.field(default_factory=Answers)
    # When the next scope entry ends: its answers must not outlive it.
    fresh_until: float = float("inf")

    @classmethod
    def of(cls, policy: Policy) -> Running:
        return cls(policy, fresh_until=policy.scopes.next_end(time.time()))


class AdminListener:
    """Where the admin listener serves, or why it does not yet: /status, the metrics and --health say so."""

    def __init__(self, address: str = "") -> None:
        self.address = address      # as --addr spells it
        self.listening = False
        self.since: str | None = None
        self.failures = 0           # binds that failed
        self.error: str | None = None
        self.server: AdminServer | None = None

    def bound(self, address: str) -> None:
        self.address, self.listening, self.since = address, True, _now()

    def failed(self, error: str) -> bool:
        """Note a failed bind; whether it is the first, which is logged."""
        self.failures += 1
        self.error = error
        return self.failures == 1

    def state(self) -> dict[str, Any]:
        return {"address": self.address, "listening": self.listening, "since": self.since,
                "failedBinds": self.failures, "lastError": self.error}


# dockerd sends a call again when its first attempt fails, but without its
# body once that was written (moby's pkg/plugins client re-sends a drained
# buffer): a call the plugin was stopping or closing the connection during.
EMPTY_REQUEST = ("the AuthZ request is empty: dockerd sent a call again without its content after its first"
                 " attempt failed (the plugin was stopping, or closing an idle connection); run the command"
                 " again")

# What a request under LARGE_REQUEST waits for: nothing (one reusable value).
NO_TURN: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()


class Plugin:
    """State shared by both listeners. Requests read self.current once."""

    def __init__(self, config_path: str, load: Callable[[str], Policy], log: Log, docker: DockerAPI,
                 mode: str | None = None, signatures: Signatures = NO_SIGNATURES) -> None:
        """load reads a policy file as the daemon may run it: load_tested_policy, which runs its tests."""
        self.config_path, self.log, self.docker, self.signatures = config_path, log, docker, signatures
        self.read_policy = load
        self.mode = mode   # --mode: overrides the file's, at every reload
        self.metrics = Metrics()
        self.current = Running.of(self.load())
        self.started = _now()
        self.reload_status: dict[str, Any] = {"time": self.started, "ok": True, "error": None}
        self.reload_lock = threading.Lock()
        self.large_requests = threading.BoundedSemaphore(LARGE_REQUESTS_AT_ONCE)
        self.swap_lock = threading.Lock()   # replacing self.current: by a reload, or when an exception ends
        self.admin = AdminListener()
        # Names this process to --health, which checks that the admin listener is its own.
        self.instance = os.urandom(8).hex()

    def reload(self) -> bool:
        """Replace the policy from the file; a bad file keeps the running one."""
        with self.reload_lock:
            try:
                policy = self.load()
            except ConfigError as error:
                self.reload_status = {"time": _now(), "ok": False, "error": str(error)}
                self.metrics.reloaded(False)
                self.log.event("error", f"reload failed, the running policy stays in force: {error}")
                return False
            with self.swap_lock:
                self.current = Running.of(policy)  # one reference: no request sees half of each
            self.reload_status = {"time": _now(), "ok": True, "error": None}
            self.metrics.reloaded(True)
            self.log.event("info", f"reloaded {self.config_path}: {policy.summary()}")
            return True

    def load(self) -> Policy:
        policy = self.read_policy(self.config_path)
        for note in policy.notes:
            self.log.event("warning", f"{self.config_path}: {note}")
        return dataclasses.replace(policy, mode=self.mode) if self.mode else policy

    @property
    def policy(self) -> Policy:
        return self.current.policy

    def turn(self, length: int) -> contextlib.AbstractContextManager[Any]:
        """Wait for a turn to read and decide a large request (LARGE_REQUESTS_AT_ONCE at a time)."""
        return self.large_requests if length > LARGE_REQUEST else NO_TURN

    def authorize(self, body: bytes) -> bytes:
        """Answer one AuthZReq body with a complete HTTP response."""
        started = time.perf_counter()
        running = self.current
        if running.fresh_until <= time.time():   # a scope entry ended: forget what it decided
            with self.swap_lock:   # unless a reload has replaced the policy meanwhile
                if self.current is running:
                    self.current = Running.of(running.policy)
                running = self.current
        policy, remembered = running.policy, running.answers
        answer = remembered.get(body)
        if answer is None:
            decision, cacheable = self.decide(policy, body)
            if decision.allow:
                answer = Answer(decision, "allow", ALLOW_RESPONSE)
            elif policy.audit:
                answer = Answer(decision, "would-deny", ALLOW_RESPONSE)
            else:
                answer = Answer(decision, "deny",
                                _plugin_response({"Allow": False, "Msg": decision.message(policy), "Err": ""}))
            # The same request under the same policy gets the same answer,
            # unless dockerd had to be asked what an image ID is.
            if cacheable and len(body) <= CACHE_BODY_MAX:
                remembered.put(body, answer)
        if answer.decision is not BENIGN or self.log.level <= LOG_LEVELS["debug"]:
            self.log.decision(answer.decision, answer.outcome, policy)
        self.metrics.count(answer.decision.operation.name, answer.outcome, time.perf_counter() - started)
        return answer.response

    def decide(self, policy: Policy, body: bytes) -> tuple[Decision, bool]:
        """The decision for an AuthZReq body, and whether it may be reused."""
        try:
            authz = json.loads(body)
        except (ValueError, RecursionError):
            authz = None
        if not isinstance(authz, dict):
            return Decision(False, REQUEST, rule="unreadable", reason=EMPTY_REQUEST if not body.strip() else
                            "the AuthZ request is not a JSON object"), False
        docker, signatures = AskedDocker(self.docker), AskedSignatures(self.signatures)
        try:
            decision = decide(policy.judged_with(signatures), authz, docker)
        except Exception as error:  # the last line of defence: a fault is a deny, never a crash or an allow
            self.log.event("error", f"internal error deciding a request: {cut(repr(error))}")
            return Decision(False, REQUEST, rule="internal-error", reason=f"internal error: {cut(repr(error))}"), False
        return decision, not docker.asked and not signatures.asked

    def status(self) -> dict[str, Any]:
        """What GET /status answers: the running policy and how the last reload went."""
        policy = self.policy
        on_disk = file_sha256(policy.path)
        return {"version": __version__, "started": self.started, "instance": self.instance, "mode": policy.mode,
                "modeFrom": "--mode" if self.mode else "policy" if "mode" in policy.keys else "default",
                "policy": {"file": policy.path, "sha256": policy.sha256,
                           "rules": {"whitelist": len(policy.whitelist.rules), "blacklist": len(policy.blacklist.rules),
                                     "scopes": len(policy.scopes.entries)}},
                "lastReload": self.reload_status, "admin": self.admin.state(),
                "log": {"droppedLines": self.log.dropped_total},
                # The file as it is now: a policy edited and not reloaded (or failing its reload) is not in force.
                "fileOnDisk": {"sha256": on_disk, "inForce": on_disk == policy.sha256}}

    def metrics_text(self) -> str:
        return self.metrics.render(self.policy, self.admin.failures, self.log.dropped_total)


@dataclass
class AskedDocker(Docker):
    """The daemon, noting whether a decision asked it: such a decision is never remembered."""

    docker: Docker
    asked: bool = False

    def images_for(self, text: str) -> list[LocalImage]:
        self.asked = True
        return self.docker.images_for(text)

    def service(self, name: str) -> dict[str, Any]:
        self.asked = True
        return self.docker.service(name)


@dataclass
class AskedSignatures(Signatures):
    """The registry, noting whether a decision asked it: such a decision is never remembered by request body
    (a tag moves, a signature comes or goes; the verdicts themselves are remembered per digest)."""

    signatures: Signatures
    asked: bool = False

    def check(self, reference: Reference, keys: tuple[PublicKey, ...]) -> SignatureVerdict:
        self.asked = True
        return self.signatures.check(reference, keys)

    def of_image(self, local: LocalImage) -> Signatures:
        self.asked = True
        return self.signatures.of_image(local)


# --------------------------------------------------------------------------
# HTTP handlers
# --------------------------------------------------------------------------

class BadRequest(ImagePolicyError):
    def __init__(self, status: HTTPStatus, text: str) -> None:
        super().__init__(text)
        self.status = status


class PluginCall(NamedTuple):
    """A request on the plugin socket, read up to its body: what answering it needs (made for every call)."""

    method: bytes
    target: bytes
    length: int        # of the body, from Content-Length
    keep_alive: bool


@dataclass(frozen=True)
class Endpoint:
    """What the plugin answers on one target of its socket."""

    respond: Callable[[Plugin, bytes], bytes]   # the answer to a body
    reads_body: bool = True   # AuthZRes: the response dockerd captured is discarded, never decoded


# The plugin socket's endpoints, by target: decisions are made in AuthZReq.
PLUGIN_ENDPOINTS: MappingProxyType[bytes, Endpoint] = MappingProxyType({
    b"/AuthZPlugin.AuthZReq": Endpoint(Plugin.authorize),
    b"/AuthZPlugin.AuthZRes": Endpoint(lambda plugin, body: ALLOW_RESPONSE, reads_body=False),
    b"/Plugin.Activate": Endpoint(lambda plugin, body: ACTIVATE_RESPONSE),
    HEALTH_ENDPOINT.encode(): Endpoint(lambda plugin, body: _plugin_response(plugin.status())),
})
OVERSIZED_RESPONSE = _plugin_response({"Allow": False, "Err": "",
                                       "Msg": f"request denied: AuthZ request larger than {MAX_BODY} bytes"})


class PluginHandler(BaseHTTPRequestHandler):
    """dockerd's side of the plugin socket: Plugin.Activate, AuthZReq, AuthZRes.

    Requests are read with a small parser of our own instead of
    parse_request(): dockerd sends a request line, a handful of headers and a
    Content-Length body, and every AuthZ call is on the path of a Docker API
    call. Each answer goes out in one write.
    """

    protocol_version = "HTTP/1.1"
    timeout = IDLE_TIMEOUT
    server: PluginServer

    def address_string(self) -> str:
        return "plugin-socket"  # unix-socket peers have no address to print

    def handle_one_request(self) -> None:
        self.close_connection = True
        try:
            call = self.read_call()
            if call is None:
                return
            self.wfile.write(self.answer(call))
            self.close_connection = not call.keep_alive
        except BadRequest as error:
            body = json.dumps({"Err": str(error)}).encode()
            with contextlib.suppress(OSError):
                self.wfile.write(b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
                                 b"Connection: close\r\n\r\n%s"
                                 % (error.status, error.status.phrase.encode(), len(body), body))
        except OSError:
            return  # an idle, stalled or vanished client (timeouts and resets): close the connection

    def read_call(self) -> PluginCall | None:
        """The request line and headers, read once; None when the client closed the connection before it."""
        line = self.rfile.readline(MAX_REQUEST_LINE + 1)
        if not line:
            return None
        if len(line) > MAX_REQUEST_LINE:
            raise BadRequest(HTTPStatus.REQUEST_URI_TOO_LONG, "request line too long")
        if not line.endswith(b"\n"):
            raise ConnectionError("client closed the connection mid-request")
        parts = line.split()
        if len(parts) != 3 or parts[2] not in (b"HTTP/1.1", b"HTTP/1.0"):
            raise BadRequest(HTTPStatus.BAD_REQUEST, "malformed request line")
        method, target, version = parts
        keep_alive = version == b"HTTP/1.1"
        length = 0
        readline = self.rfile.readline
        for _ in range(MAX_HEADERS + 1):
            header = readline(MAX_HEADER_LINE + 1)
            if header == b"\r\n" or header == b"\n":
                return PluginCall(method, target, length, keep_alive)
            if not header.endswith(b"\n"):
                if len(header) > MAX_HEADER_LINE:
                    raise BadRequest(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, "header line too long")
                raise ConnectionError("client closed the connection mid-request")
            name, colon, value = header.partition(b":")
            if not colon:
                raise BadRequest(HTTPStatus.BAD_REQUEST, "malformed header line")
            name = name.lower()
            if name == b"content-length":
                if not value.strip().isdigit() or len(value.strip()) > 18:
                    raise BadRequest(HTTPStatus.BAD_REQUEST, "invalid Content-Length")
                length = int(value)
            elif name == b"connection":
                option = value.strip().lower()
                keep_alive = option == b"keep-alive" or (keep_alive and option != b"close")
            elif name == b"transfer-encoding":
                raise BadRequest(HTTPStatus.NOT_IMPLEMENTED, "chunked requests are not supported; send Content-Length")
        raise BadRequest(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, f"more than {MAX_HEADERS} headers")

    def answer(self, call: PluginCall) -> bytes:
        """The answer to a call, once its body is read (or discarded)."""
        if call.method != b"POST":
            raise BadRequest(HTTPStatus.METHOD_NOT_ALLOWED, "plugin endpoints accept POST only")
        endpoint = PLUGIN_ENDPOINTS.get(call.target)
        if endpoint is None:
            raise BadRequest(HTTPStatus.NOT_FOUND, f"no such plugin endpoint {call.target[:100]!r}")
        if not endpoint.reads_body:
            self.discard(call.length)
            return endpoint.respond(self.server.plugin, b"")
        if call.length > MAX_BODY:
            self.discard(call.length)
            return OVERSIZED_RESPONSE
        with self.server.plugin.turn(call.length):
            body = self.rfile.read(call.length)
            if len(body) < call.length:
                raise ConnectionError("client closed the connection mid-body")
            return endpoint.respond(self.server.plugin, body)

    def discard(self, length: int) -> None:
        while length > 0:
            chunk = self.rfile.read(min(length, 1 << 20))
            if not chunk:
                raise ConnectionError("client closed the connection mid-body")
            length -= len(chunk)


class AdminHandler(BaseHTTPRequestHandler):
    """Read-only status endpoints: /health, /config, /version (the original plugin's), /status, /metrics."""

    protocol_version = "HTTP/1.1"
    timeout = 10.0
    server: AdminServer
    server_version = PLUGIN_NAME   # and no Python version
    error_content_type = "text/plain; charset=utf-8"
    error_message_format = "%(code)d %(message)s\n"

    def version_string(self) -> str:
        return self.server_version

    def address_string(self) -> str:
        return self.client_address[0] if self.client_address else "admin-socket"   # unix peers have none

    def do_GET(self) -> None:
        self.answer(head=False)

    def do_HEAD(self) -> None:
        self.answer(head=True)

    def answer(self, head: bool) -> None:
        plugin, path = self.server.plugin, self.path.partition("?")[0]
        self.head = head
        if path == "/health":
            self.reply(b"HEALTHY", "text/plain; charset=utf-8")
        elif path == "/config":   # the configuration object, indented as the original plugin's Go did
            self.reply(json.dumps(plugin.policy.configuration(), indent=4).encode(), "application/json")
        elif path == "/version":
            self.reply(__version__.encode(), "text/plain; charset=utf-8")
        elif path == "/status":
            self.reply(json.dumps(plugin.status(), indent=2).encode() + b"\n", "application/json")
        elif path == "/metrics":
            self.reply(plugin.metrics_text().encode(), "text/plain; version=0.0.4; charset=utf-8")
        else:
            self.send_error(HTTPStatus.NOT_FOUND, "no such endpoint (try /health, /config, /version, /status,"
                                                  " /metrics)")

    def not_allowed(self) -> None:
        self.send_error(HTTPStatus.METHOD_NOT_ALLOWED, "the admin listener is read-only: GET and HEAD only")

    do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = not_allowed

    def reply(self, body: bytes, content_type: str) -> None:
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not self.head:
            self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        self.server.plugin.log.event("debug", "admin: " + cut(format % args))


# --------------------------------------------------------------------------
# Servers
# --------------------------------------------------------------------------

def claim_socket_path(path: str) -> None:
    """Remove a stale socket at path; refuse if something live or not a socket is there."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise ImagePolicyError(f"{path} exists and is not a socket; refusing to replace it")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(path)
        except (ConnectionRefusedError, FileNotFoundError):
            os.unlink(path)  # left behind by a process that is gone
            return
        except OSError as error:
            raise ImagePolicyError(f"cannot tell whether {path} is in use ({error}); refusing to start") from None
    raise ImagePolicyError(f"another process is already serving {path}; stop it first")


class PluginServer(socketserver.UnixStreamServer, ThreadingHTTPServer):   # type: ignore[misc]
    """The plugin socket, readable and writable by root only.

    Each connection gets its own thread, as with ThreadingHTTPServer, but
    threads are reused: under load dockerd opens a new connection for about
    every fourth call, and starting a thread costs more than answering one.
    The number of threads is not bounded, on purpose: while the plugin looks
    an image up through the Docker API, dockerd asks the plugin about that
    lookup on a new connection, and a bounded pool could wait on itself.
    """

    request_queue_size = 64
    max_idle_workers = 32

    def __init__(self, path: str, plugin: Plugin) -> None:
        self.plugin = plugin
        self.inode: int | None = None
        self.idle_workers: list[queue.SimpleQueue] = []
        self.workers_lock = threading.Lock()
        super().__init__(path, PluginHandler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        self.plugin.log.event("error", f"plugin socket: {cut(repr(sys.exc_info()[1]))}")   # one line, for journald

    def process_request(self, request: Any, client_address: Any) -> None:
        with self.workers_lock:
            inbox = self.idle_workers.pop() if self.idle_workers else None
        if inbox is None:
            inbox = queue.SimpleQueue()
            threading.Thread(target=self.work, args=(inbox,), daemon=True).start()
        inbox.put((request, client_address))

    def work(self, inbox: queue.SimpleQueue) -> None:
        while True:
            request, client_address = inbox.get()
            self.process_request_thread(request, client_address)   # handles errors, closes the connection
            with self.workers_lock:
                if len(self.idle_workers) >= self.max_idle_workers:
                    return
                self.idle_workers.append(inbox)

    def server_bind(self) -> None:
        self.inode = bind_private_socket(self.socket, str(self.server_address))

    def server_close(self) -> None:
        super().server_close()
        release_socket(str(self.server_address), self.inode)


def bind_private_socket(sock: socket.socket, path: str) -> int:
    """Bind sock to path, readable and writable by root only; its inode, to release it later."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), mode=0o755, exist_ok=True)
    claim_socket_path(path)
    previous = os.umask(0o177)  # no moment where the socket is open to others
    try:
        sock.bind(path)
    finally:
        os.umask(previous)
    return os.stat(path).st_ino


def release_socket(path: str, inode: int | None) -> None:
    try:   # a successor may have bound the path since: leave its socket alone
        if inode is not None and os.stat(path).st_ino == inode:
            os.unlink(path)
    except FileNotFoundError:
        pass


AdminAddress = tuple[str, int] | str   # HOST, PORT, or the path of a unix socket


class AdminServer(ThreadingHTTPServer):
    """The admin listener, on TCP or on a unix socket that only root may use."""

    def __init__(self, address: AdminAddress, plugin: Plugin) -> None:
        self.plugin = plugin
        self.inode: int | None = None
        if isinstance(address, str):
            self.address_family = socket.AF_UNIX
        else:
            self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        super().__init__(address, AdminHandler)   # type: ignore[arg-type]
        plugin.admin.bound(self.name())

    def name(self) -> str:
        """The address bound (the port chosen, for --addr …:0), as --addr spells it."""
        if self.address_family == socket.AF_UNIX:
            return f"unix:{self.server_address}"
        host, port = str(self.server_address[0]), self.server_address[1]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    def handle_error(self, request: Any, client_address: Any) -> None:
        self.plugin.log.event("error", f"admin listener: {cut(repr(sys.exc_info()[1]))}")

    def server_bind(self) -> None:
        if self.address_family == socket.AF_UNIX:
            self.inode = bind_private_socket(self.socket, str(self.server_address))
            self.server_name, self.server_port = str(self.server_address), 0
            return
        socketserver.TCPServer.server_bind(self)  # no reverse DNS lookup of the address
        self.server_name, self.server_port = str(self.server_address[0]), self.server_address[1]

    def server_close(self) -> None:
        super().server_close()
        if self.address_family == socket.AF_UNIX:
            release_socket(str(self.server_address), self.inode)


def bind_admin(address: AdminAddress, plugin: Plugin) -> AdminServer | None:
    """The admin listener, or None while its address is taken (the first failure is logged)."""
    try:
        return AdminServer(address, plugin)
    except (OSError, ImagePolicyError) as error:
        if plugin.admin.failed(str(error)):
            plugin.log.event("error", f"cannot listen on {plugin.admin.address}: {error}; the plugin socket serves"
                                      f" dockerd, and the admin listener is retried every {ADMIN_RETRY_INTERVAL:g} s")
        return None


def serve_admin(address: AdminAddress, plugin: Plugin, server: AdminServer | None, stopping: threading.Event) -> None:
    """Serve the admin listener, binding it first while its address is taken.

    The plugin socket never waits for it: any local user can listen on a
    loopback port first, and a plugin that exited then would take the
    Docker API down with it.
    """
    while server is None:
        if stopping.wait(ADMIN_RETRY_INTERVAL):
            return
        server = bind_admin(address, plugin)
        if server is not None:
            plugin.log.event("info", f"admin listener on {plugin.admin.address}, after {plugin.admin.failures}"
                                     " failed binds")
    plugin.admin.server = server
    server.serve_forever()


def startup_warnings() -> list[str]:
    """What this Python lacks that the plugin would use: said once, at start, never silently degraded."""
    if regex_parser is None:
        return ["this Python has no re._parser: rules are not indexed by their literal prefix (each rule is tried"
                " on every name, which is slower with many rules) and --validate cannot say what a rule begins with"]
    return []


def notify_systemd(state: str, log: Log) -> None:
    """sd_notify(3) without libsystemd: one datagram to $NOTIFY_SOCKET.

    A notification that cannot be sent is logged, never fatal: the plugin
    serves dockerd whether or not systemd hears about it.
    """
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
            notify.connect(address)
            notify.sendall(state.encode())
    except (OSError, ValueError) as error:
        log.event("warning", f"cannot notify systemd at NOTIFY_SOCKET={os.environ['NOTIFY_SOCKET']!r}: {error}")


# --------------------------------------------------------------------------
# Judging without dockerd: a docker command's request, and the policy's own tests
# --------------------------------------------------------------------------

def client_request(path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
    """The AuthZReq dockerd sends for a docker CLI call: POST path, with its JSON body."""
    request: dict[str, Any] = {"RequestMethod": "POST", "RequestUri": "/v1.41" + path, "RequestHeaders": {}}
    if body is not None:
        raw = json.dumps(body).encode()
        request["RequestBody"] = base64.b64encode(raw).decode()
        request["RequestHeaders"] = {"Content-Type": "application/json", "Content-Length": str(len(raw))}
    return request


def _pull_request(image: str) -> dict[str, Any]:
    # docker pull sends tag=latest for a name without tag or digest; no tag at all means every tag.
    untagged = "@" not in image and ":" not in image.rsplit("/", 1)[-1]
    return client_request(f"/images/create?fromImage={quote(image, safe='')}" + ("&tag=latest" if untagged else ""))


def _service_request(image: str) -> dict[str, Any]:
    return client_request("/services/create", {"Name": "check", "TaskTemplate": {"ContainerSpec": {"Image": image}}})


class NoDaemon(Docker):
    """No daemon to ask: what an image ID or a hex name means is not known."""

    def images_for(self, text: str) -> list[LocalImage]:
        raise ImagePolicyError("dockerd looks a hex name up as an image ID; give --docker-host to judge it")

    def service(self, name: str) -> dict[str, Any]:
        raise ImagePolicyError("no daemon to ask about services")


NO_DAEMON = NoDaemon()


def judge(policy: Policy, operation: Operation, image: str, target: str = "", docker: Docker = NO_DAEMON) -> Decision:
    """The decision for a docker CLI command, made as dockerd's request would be."""
    if operation.request is None:
        raise ImagePolicyError(f"no docker command sends a {operation} request alone")
    return decide(policy, operation.request(image, target), docker)


class PolicyTestsFailed(ConfigError):
    """A policy whose own tests fail: refused at start, on reload and by --validate."""

    def __init__(self, path: str, failures: list[str], total: int) -> None:
        self.failures = failures
        super().__init__(path, '"tests"', f"{len(failures)} of {total} tests fail: " + "; ".join(failures))


def policy_test_failures(policy: Policy) -> list[str]:
    """Each of the policy's tests that its rules contradict, with the rule that decided."""
    failures = []
    for test in policy.tests:
        decision = judge(test.policy(policy), test.operation, test.image, test.target)
        if decision.allow != test.allow:
            failures.append(f"{test}: expected {'allow' if test.allow else 'deny'}, but {decision.message(None)}"
                            f" [{decision.rule}]" + (f" ({test.note})" if test.note else ""))
    return failures


def load_tested_policy(path: str) -> Policy:
    """The policy in path, if it is valid and passes its own tests: what the daemon may run."""
    policy = load_policy(path)
    failures = policy_test_failures(policy)
    if failures:
        raise PolicyTestsFailed(path, failures, len(policy.tests))
    return policy


# --------------------------------------------------------------------------
# Offline tools: --check, --scan, --replay
# --------------------------------------------------------------------------

def check_operation(policy: Policy, operation: Operation, images: list[str], target: str, docker: Docker,
                    output: str) -> int:
    """--check: each image's decision for operation; 1 when any is denied."""
    results = [(image, judge(policy, operation, image, target, docker)) for image in images]
    if output == "json":
        print(json.dumps([{"image": image, "operation": decision.operation.name, "decision": _verdict_word(decision),
                           "canonical": decision.image, "rule": decision.rule, "reason": decision.reason}
                          for image, decision in results], indent=2))
    for image, decision in results if output == "text" else ():
        print(image or operation.command)
        if operation is not PULL:
            print(f"  operation: {decision.operation}")
        if decision.image:
            print(f"  canonical: {decision.image}\n  familiar:  {decision.familiar}")
        verdict = _verdict_word(decision)
        if policy.audit and not decision.allow:
            verdict += " (audit mode: logged as would-deny and allowed)"
        print(f"  decision:  {verdict}")
        if decision.rule != "unreadable":
            print(f"  rule:      {decision.rule}")
        print(f"  reason:    {decision.reason}")
    return 1 if any(not decision.allow for _, decision in results) else 0


def _verdict_word(decision: Decision) -> str:
    return "allow" if decision.allow else "deny"


class HostImages(Docker):
    """The images a scan listed, answering lookups as DockerAPI.images_for would, without asking again."""

    def __init__(self, images: list[LocalImage]) -> None:
        self.by_name: dict[str, LocalImage] = {}
        for image in images:
            for name in image.names:
                with contextlib.suppress(InvalidReference):
                    self.by_name.setdefault(parse_reference(name).canonical, image)
        self.by_id = {image.id.removeprefix("sha256:"): image for image in images}
        self.ids = sorted(self.by_id)

    def images_for(self, text: str) -> list[LocalImage]:
        found = {}
        with contextlib.suppress(InvalidReference):   # dockerd tries the text as a name first
            named = self.by_name.get(parse_reference(text).canonical)
            if named:
                found[named.id] = named
        prefix = text.removeprefix("sha256:")
        if IMAGE_ID_LIKE_RE.fullmatch(text):
            for image_id in self.ids[bisect.bisect_left(self.ids, prefix):]:
                if not image_id.startswith(prefix):
                    break
                found.setdefault(self.by_id[image_id].id, self.by_id[image_id])
        return list(found.values())

    def service(self, name: str) -> dict[str, Any]:
        raise ImagePolicyError("a scan judges services by their current spec")


@dataclass(frozen=True)
class Finding:
    """Something on a host, and the policy's decision on it."""

    kind: str    # image, container or service
    id: str
    name: str
    decision: Decision


@dataclass(frozen=True)
class Scan:
    images: int
    containers: int
    services: int | None   # None: the daemon is no swarm manager
    findings: tuple[Finding, ...]

    @property
    def refused(self) -> list[Finding]:
        return [finding for finding in self.findings if not finding.decision.allow]

    def excepted(self, policy: Policy) -> list[tuple[Finding, ScopeEntry]]:
        """What only an exception allows: a scope entry with an end."""
        found = []
        for finding in self.findings:
            entry = finding.decision.decided_by if finding.decision.allow else None
            if isinstance(entry, ScopeEntry) and entry.until is not None:
                found.append((finding, entry))
        return found


def scan_host(policy: Policy, docker: DockerAPI) -> Scan:
    """Judge every image name (a pull), nameless image (a run by ID), container (a run of the image it
    was created from) and service (its spec, as a service update) on the daemon."""
    images, containers, services = docker.images(), docker.containers(), docker.services()
    host = HostImages(images)
    findings = []
    for image in images:
        for name in image.names:   # in a signed scope, by the digest it was pulled by
            findings.append(Finding("image", image.id, name, judge(policy.of_image(image), PULL, name)))
        if not image.names:
            findings.append(Finding("image", image.id, "<none>", judge(policy, RUN, image.id, docker=host)))
    for container in containers:
        findings.append(Finding("container", container.id, container.name,
                                judge(policy, RUN, container.image, docker=host)))
    for service in services or ():
        findings.append(Finding("service", service.id, service.name,
                                decide(policy, client_request("/services/create", service.spec), host)))
    return Scan(len(images), len(containers), None if services is None else len(services), tuple(findings))


def print_scan(policy: Policy, scan: Scan, output: str) -> int:
    refused = scan.refused
    if output == "json":
        print(json.dumps({
            "host": socket.gethostname(), "time": _now(),   # a fleet's scans merge by host and time
            "policy": policy.path, "policySha256": policy.sha256, "mode": policy.mode,
            "scanned": {"images": scan.images, "containers": scan.containers, "services": scan.services},
            "refused": [{"kind": finding.kind, "id": finding.id, "name": finding.name,
                         "operation": finding.decision.operation.name, "image": finding.decision.image,
                         "rule": finding.decision.rule, "reason": finding.decision.reason}
                        for finding in refused],
            "exceptions": [{"kind": finding.kind, "id": finding.id, "name": finding.name, "rule": f"scopes[{entry.index}]",
                            "until": entry.until_text, "ticket": entry.ticket}
                           for finding, entry in scan.excepted(policy)]}, indent=2))
        return 1 if refused else 0
    for finding in refused:
        short = finding.id.removeprefix("sha256:")[:12]
        print(f"{finding.kind} {finding.name} ({short}): {finding.decision.message(None)} [{finding.decision.rule}]")
    for finding, entry in scan.excepted(policy):
        short = finding.id.removeprefix("sha256:")[:12]
        print(f"{finding.kind} {finding.name} ({short}): allowed only by the exception {entry}, until"
              f" {entry.until_text}" + (f" (ticket {entry.ticket})" if entry.ticket else ""))
    services = "no services (not a swarm manager)" if scan.services is None else _count(scan.services, "service")
    print(f"{len(refused)} refused of {len(scan.findings)} judged: {_count(scan.images, 'image')},"
          f" {_count(scan.containers, 'container')}, {services}; policy {policy.path}, mode {policy.mode}")
    return 1 if refused else 0


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}" + ("" if number == 1 else "s")


def canonical_reference(text: str) -> Reference:
    """A reference from its canonical form, as the decision log writes it: nothing is added or changed."""
    match = REFERENCE_RE.fullmatch(text)
    if not match or match["domain"] is None:
        raise InvalidReference(f"not a canonical reference: {text!r}")
    return Reference(match["domain"], match["path"], match["tag"], match["digest"])


class NotReplayable(ImagePolicyError):
    """A logged decision that cannot be made again from its log line; the message says why."""


def _logged_name(record: dict[str, Any]) -> Reference:
    """The reference a run, image mount, service or tag named, unless dockerd had to resolve it then."""
    named = record.get("name")
    if named is not None:
        if not isinstance(named, str) or IMAGE_ID_LIKE_RE.fullmatch(named):
            raise NotReplayable("an image ID resolved at the time")
        return parse_reference(named)
    if record.get("rule") == "checkRun":
        raise NotReplayable("a run or tag under checkRun false, which logs no image")
    return canonical_reference(record["image"])


def _replay_image(operation: Operation, policy: Policy, record: dict[str, Any]) -> Decision:
    if operation in (RUN, IMAGE_MOUNT) and not policy.check_run:
        return unchecked(RUN)
    reference = _logged_name(record)
    return decision_for(operation, reference, policy.evaluate(reference))


def _replay_tag(policy: Policy, record: dict[str, Any]) -> Decision:
    if not policy.check_run:
        return unchecked(TAG)
    if not isinstance(record.get("target"), str):
        raise NotReplayable("a tag whose new name was not logged")
    reference = _logged_name(record)
    source = decision_for(TAG, reference, policy.evaluate(reference), reference.familiar)
    return decide_tag_target(policy, source, canonical_reference(record["target"])) if source.allow else source


def replay_decision(policy: Policy, record: dict[str, Any]) -> Decision:
    """The decision policy makes for a logged one; NotReplayable says why it cannot."""
    if record.get("rule") in ("unreadable", "internal-error"):
        raise NotReplayable("a request that could not be read")
    if record.get("rule") == "image-id":
        raise NotReplayable("an image ID resolved at the time")
    name = record.get("operation")
    operation = OPERATIONS.get(name) if isinstance(name, str) else None
    if operation is None or operation.replay is None:
        raise NotReplayable("not an image operation")
    try:
        if policy.scopes.entries:   # judged at the time it was made, for the caller who asked
            policy = dataclasses.replace(policy.asked_by(logged_caller(record.get("caller"))),
                                         at=parse_time(record.get("time", "")))
        return operation.replay(operation, policy, record)
    except (KeyError, TypeError, AttributeError, InvalidReference) as error:
        raise NotReplayable("a line without a readable image") from error


@dataclass
class Change:
    """Logged decisions on one image that policy would decide the other way."""

    image: str
    now: Decision
    operations: dict[str, int] = dataclasses.field(default_factory=dict)

    @property
    def count(self) -> int:
        return sum(self.operations.values())


@dataclass
class Replay:
    decisions: int = 0
    other_lines: int = 0
    allowed: int = 0   # none: a log written with --log-decisions denies, whose allows cannot be replayed
    changes: dict[tuple[str, bool], Change] = dataclasses.field(default_factory=dict)
    not_replayable: dict[str, int] = dataclasses.field(default_factory=dict)
    hosts: dict[str, int] = dataclasses.field(default_factory=dict)   # decisions by host, when the export names it
    first: str = ""   # the earliest and latest "time" logged
    last: str = ""

    @property
    def changed(self) -> int:
        return sum(change.count for change in self.changes.values())

    @property
    def span(self) -> str:
        return f"from {self.first} to {self.last}" if self.first else "at times not logged"


# What journalctl -o short-iso and -o short write before a message: time, host, identifier[pid].
_JOURNAL_PREFIX_RE = re.compile(r"(?:\S+|[A-Z][a-z]{2} [ 0-9]\d \d\d:\d\d:\d\d(?:\.\d+)?) (?P<host>\S+) [^\s:]+: ")


def logged_decision(line: str) -> tuple[dict[str, Any] | None, str | None]:
    """The decision object in a line of the log as the plugin wrote it or as journalctl exports it
    (-o cat, -o short-iso or -o short, -o json), and the host the export names; None for other lines."""
    start = line.find("{")
    if start == -1:
        return None, None
    try:
        record = json.loads(line[start:])
    except ValueError:
        return None, None
    if isinstance(record, dict) and "MESSAGE" in record and "decision" not in record:   # journalctl -o json
        message, host = record["MESSAGE"], record.get("_HOSTNAME")
        if isinstance(message, list):   # journalctl writes a message that is not UTF-8 as an array of its bytes
            message = bytes(byte for byte in message if isinstance(byte, int) and 0 <= byte < 256).decode(
                errors="replace")
        decision = logged_decision(message)[0] if isinstance(message, str) else None
        return decision, host if isinstance(host, str) else None
    prefix = _JOURNAL_PREFIX_RE.fullmatch(line[:start])
    return record if isinstance(record, dict) else None, prefix["host"] if prefix else None


def replay_log(policy: Policy, lines: Any) -> Replay:
    """Decide each logged image decision again under policy; count what changes and what cannot be redone."""
    replay = Replay()
    for line in lines:
        record, host = logged_decision(line)
        if record is None or record.get("decision") not in ("allow", "deny", "would-deny"):
            replay.other_lines += 1
            continue
        replay.decisions += 1
        replay.allowed += record["decision"] == "allow"
        if host is not None:
            replay.hosts[host] = replay.hosts.get(host, 0) + 1
        logged = record.get("time")
        if isinstance(logged, str) and logged:   # the plugin writes UTC as 2026-12-07T06:11:06Z: sorts as text
            replay.first = min(replay.first or logged, logged)
            replay.last = max(replay.last, logged)
        try:
            decision = replay_decision(policy, record)
        except NotReplayable as error:
            replay.not_replayable[str(error)] = replay.not_replayable.get(str(error), 0) + 1
            continue
        was_allowed = record["decision"] == "allow"
        if decision.allow == was_allowed:
            continue
        image = decision.familiar or decision.image or decision.operation.name
        change = replay.changes.setdefault((image, decision.allow), Change(image, decision))
        change.operations[decision.operation.name] = change.operations.get(decision.operation.name, 0) + 1
    return replay


# Said whenever a log holds no allowed decision: replay cannot find what a candidate would newly deny.
ONLY_DENIES = ("the log holds no allowed decision (written with --log-decisions denies?), so no allow -> deny"
               " change can be found in it; replay a log written with --log-decisions all")


def print_replay(policy: Policy, source: str, replay: Replay, output: str) -> int:
    if not replay.decisions:
        print(f"{PLUGIN_NAME}: error: no decision read from {source} ({replay.other_lines} other lines): expected"
              " the plugin's decision log as it wrote it or as journalctl -o cat, -o short-iso or -o json"
              " exports it", file=sys.stderr)
        return 2
    changes = sorted(replay.changes.values(), key=lambda change: (-change.count, change.image))
    to_deny = sum(change.count for change in changes if not change.now.allow)
    if output == "json":
        print(json.dumps({
            "policy": policy.path, "log": source,
            "changes": [{"image": change.image, "was": "deny" if change.now.allow else "allow",
                         "now": _verdict_word(change.now), "count": change.count, "operations": change.operations,
                         "rule": change.now.rule, "reason": change.now.reason} for change in changes],
            "summary": {"decisions": replay.decisions, "changed": replay.changed, "allowToDeny": to_deny,
                        "denyToAllow": replay.changed - to_deny, "notReplayable": replay.not_replayable,
                        "otherLines": replay.other_lines, "onlyDenies": not replay.allowed,
                        "from": replay.first or None, "to": replay.last or None, "hosts": replay.hosts}}, indent=2))
        return 1 if changes else 0
    for change in changes:
        was, now = ("allow", "deny") if not change.now.allow else ("deny", "allow")
        operations = ", ".join(f"{operation} {count}" for operation, count in sorted(change.operations.items()))
        times = "1 time" if change.count == 1 else f"{change.count} times"
        print(f"{change.image}: {was} -> {now}, {times} ({operations}): {change.now.reason}"
              f" [{change.now.rule}]")
    if not replay.allowed:
        print(f"note: {ONLY_DENIES}")
    hosts = (", ".join(f"{host} ({count})" for host, count in sorted(replay.hosts.items())) if replay.hosts else
             "not named in the log (journalctl -o cat leaves them out; -o short-iso and -o json keep them)")
    print(f"log {source}: decisions {replay.span}; hosts: {hosts}")
    unchanged = replay.decisions - replay.changed - sum(replay.not_replayable.values())
    summary = (f"{replay.decisions} decisions replayed under {policy.path}: {replay.changed} would change"
               f" ({to_deny} allow -> deny, {replay.changed - to_deny} deny -> allow) on {len(changes)} images,"
               f" {unchanged} unchanged")
    if replay.not_replayable:
        summary += "; not decided again: " + ", ".join(
            f"{count} {reason}" for reason, count in sorted(replay.not_replayable.items()))
    print(summary + f"; {replay.other_lines} other lines")
    return 1 if changes else 0


# --------------------------------------------------------------------------
# The linter: --validate's warnings
# --------------------------------------------------------------------------

def go_era_warning(policy: Policy) -> str | None:
    """For a file with only the Go plugin's keys: what this plugin decides that the Go plugin never looked at,
    and the keys that keep the Go plugin's behaviour."""
    if policy.keys - GO_PLUGIN_KEYS:
        return None
    refused = {operation.name.replace("-", " "): verdict.rule for operation, verdict in policy.operations.items()
               if not verdict.allow}
    restore = ['"checkRun": false'] + [f'"{key}": true' for key in refused.values() if key != "allowImport"]
    return ("this file has only the Go plugin's keys (whitelist, blacklist, defaultAllow), and this plugin decides"
            " more than pulls: it judges runs, creates, image mounts and tags by image name (\"checkRun\", default"
            " true), and services and plugin installs too; build, commit, import, load, plugin create and swarm"
            f" init/join follow allowBuild, allowCommit, allowImport, allowLoad, allowPluginCreate and allowSwarm,"
            f" which follow defaultAllow ({str(policy.default_allow).lower()}"
            + (": " + ", ".join(refused) + " are refused" if refused else "")
            + "). The Go plugin let all of these through unchecked, except imports, which it failed. To decide only"
            " what it decided, add " + ", ".join(restore) + " (services and plugin installs stay judged by name);"
            " to keep the new checks, add them with the values you mean")


# Registries anyone can push to: an allow over every host under one of them admits strangers' images.
PUBLIC_REGISTRY_DOMAINS = frozenset({"docker.io", "docker.com", "gcr.io", "pkg.dev", "amazonaws.com", "ecr.aws",
                                     "azurecr.io", "ghcr.io", "github.com", "quay.io", "gitlab.com", "icr.io",
                                     "ocir.io", "k8s.io"})
# Exceptions that end this soon are named by --validate, so that they are renewed or retired in time.
EXCEPTION_NOTICE = 14 * 86400


def scope_warnings(policy: Policy, now: float) -> list[str]:
    """Mistakes scopes still allow: entries that ended or end soon, that no image reaches, that admit strangers."""
    warnings = []
    entries = policy.scopes.entries
    for entry in entries:
        if entry.until is not None and entry.until <= now:
            warnings.append(f"{entry} ended at {entry.until_text}: it decides nothing now; remove it")
        elif entry.until is not None and entry.until - now < EXCEPTION_NOTICE:
            days = (entry.until - now) / 86400
            warnings.append(f"{entry} ends at {entry.until_text}, in {days:.1f} days"
                            + (f" (ticket {entry.ticket})" if entry.ticket else ""))
        for tag in entry.tags:
            if tag[0] in ".-":
                warnings.append(f"{entry}: tags {json.dumps(tag)} matches no tag (a tag starts with a letter, digit"
                                " or _)")
        host = entry.scope.split("/")[0]
        domain = host.removeprefix("*.").split(":")[0]
        if entry.allow and host.startswith("*.") and ("." not in domain or any(
                domain == public or domain.endswith("." + public) for public in PUBLIC_REGISTRY_DOMAINS)):
            warnings.append(f"{entry} allows every registry under {domain}, where anyone can publish images; name"
                            " your own registry or namespace instead")
        components = entry.scope.split("/")
        if components[0] == "docker.io" and len(components) == 2 and components[1] != "library":
            warnings.append(f"{entry} is the Docker Hub namespace {components[1]} ({components[1]}/…), not the"
                            f" official image {components[1]}, which is docker.io/library/{components[1]}")
        blocker = next((other for other in entries if other.scope == entry.scope and not other.allow
                        and not (other.tags or other.digest_only or other.callers or other.until)), None)
        if entry.allow and blocker:
            warnings.append(f"{entry} can never allow: {blocker} denies everything in its scope")
        probes = [f"{entry.scope.replace('*.', 'zz0.')}/zz0:1", f"{entry.scope.replace('*.', 'zz0.')}/zz0/zz0:1"]
        probes += [f"{entry.scope}:1"] if "/" in entry.scope and not host.startswith("*.") else []
        for rules in (policy.whitelist, policy.blacklist):
            decisive = {rules.first_match(parse_reference(probe)) for probe in probes}
            if None not in decisive:
                rule = min(decisive, key=_rule_index)   # type: ignore[arg-type]
                warnings.append(f"{entry} is dead: {rule} decides every image in its scope first")
                break
    return warnings


# Suffixes that complete a literal prefix into a reference, to see whether a
# pattern can match any image at all.
_COMPLETIONS = ("", "a", ":a", "/a", "a/a", "a:a", "0", "0/a", "@sha256:" + "0" * 64, "a@sha256:" + "0" * 64)
# ^ at the start, after any inline flags such as (?i).
ANCHORED_RE = re.compile(r"(?:\(\?[imsU]+\))*(?:\^|\\A)")
# The inline flags a pattern starts with: a suggested fix keeps them.
INLINE_FLAGS_RE = re.compile(r"(?:\(\?[imsU]+\))*")
# Canonical names of Docker Hub images that no familiar-name rule was written for.
# What may follow a whitelist rule's leading text in a name its author did not
# mean: another Docker Hub user (nginxevil/miner), another repository
# (quay.io/calico/node-evil), another registry (nginx:5000/evil/miner,
# localhost:50000/evil/miner, registry.example.com.evil.example/miner).
_NAME_PROBES = ("evil/miner", "-evil", ":5000/evil/miner", "{port}/evil/miner", ".evil.example/miner")
# Images a blacklist rule may be shown refusing, when the rules suggest none.
_SAMPLE_IMAGES = ("evil/miner:1", "ubuntu:latest")
# Names of every shape, as rules see them: a rule that matches the empty text may still match none of them.
_EVERY_KIND_OF_NAME = ("nginx:1", "someone/app:v2", "quay.io/calico/node:v3.27", "localhost:5000/a_b:1",
                       "nginx@sha256:" + "0" * 64, "nginx:sha256:" + "0" * 64, "docker.io/library/nginx:1")
# The start of a digest pin as the original plugin saw it (nginx:sha256:…), and the hex digits each digest has.
_DIGEST_AS_TAG_RE = re.compile(r":(?P<algorithm>sha256|sha384|sha512):(?P<hex>[0-9a-f]*)\Z")
_DIGEST_LENGTHS = MappingProxyType({"sha256": 64, "sha384": 96, "sha512": 128})
# A dot that matches any character: not escaped, not in a class, not repeated as in .*
_DOT_RE = re.compile(r"""
      \\.                          # an escaped character
    | \[\^?\]?(?:\\.|[^]\\])*\]    # a character class, where . is a dot
    | (?P<dot>\.)(?![*+?{])        # a dot standing for any character
    | .
    """, re.VERBOSE | re.DOTALL)

def _may_start_hub_names(prefix: str) -> bool:
    """Whether canonical Docker Hub names (docker.io/…) may start with prefix: only then do they differ from
    the familiar names a rule is matched against."""
    return prefix.startswith("docker.io/") or "docker.io/".startswith(prefix)


def policy_warnings(policy: Policy) -> list[str]:
    """Likely mistakes in a valid configuration, for --validate: each names the
    rule, an image it wrongly allows or refuses, or that it never matches, and a fix."""
    warnings = []
    for rule in policy.whitelist.rules + policy.blacklist.rules:
        warnings += _pattern_warnings(rule)
        if rule.kind == "whitelist":
            warnings += _name_warnings(policy, rule)
    bases = [text for text, _ in (_leading_text(rule.regex) for rule in policy.whitelist.rules) if text]
    for blocked in policy.blacklist.rules:
        for allowed in policy.whitelist.rules:
            if (allowed.only_prefix and allowed.prefix is not None and blocked.prefix is not None
                    and blocked.prefix.startswith(allowed.prefix)
                    and (allowed.canonical or not blocked.canonical or not _may_start_hub_names(blocked.prefix))):
                warnings.append(f"{blocked} is unreachable: {allowed} allows everything it matches first")
                break
        else:
            if not policy.default_allow:
                warnings.append(_futile_warning(policy, blocked, bases))
    return warnings


def _pattern_warnings(rule: Rule) -> list[str]:
    """Patterns that match everything, anywhere, or nothing at all."""
    if rule.search(""):
        matched = [name for name in _EVERY_KIND_OF_NAME if rule.search(name)]
        if len(matched) == len(_EVERY_KIND_OF_NAME):
            if rule.kind == "whitelist":   # a blacklist that catches everything is a common ending
                return [f"{rule}: matches every image, so the whitelist allows everything"]
            return []
        if not matched:
            return [f"{rule}: matches the empty text but no image name: every reference has a tag or digest"
                    " (nginx:1), which it does not allow for"]
    if rule.prefix is None:
        if not ANCHORED_RE.match(rule.pattern) and not re.search(r"(?<!\\)(\$|\\z)$", rule.pattern):
            return [f"{rule}: not anchored with ^ (or $), so it matches anywhere in an image name"]
    else:
        forms: set[str] = set()
        for name in [rule.prefix + completion for completion in _COMPLETIONS] + [_pinned(rule.prefix)]:
            try:
                reference = parse_reference(name)
            except InvalidReference:
                continue
            forms.update(reference.forms(False) + (reference.forms(True) if rule.canonical else ()))
        if not any(form.startswith(rule.prefix) for form in forms):
            return [f"{rule}: no image reference can match it (rules see familiar names such as nginx:1.25, and"
                    " canonical ones such as docker.io/library/nginx:1.25 only when they name docker.io;"
                    " index.docker.io is spelled docker.io)"]
        if not rule.canonical and any(rule.search(probe) for probe in HUB_PROBES):
            what = "allow" if rule.kind == "whitelist" else "refuse"
            return [f"{rule}: matched against familiar names (nginx:1.25) as the original plugin did, so it does"
                    f" not {what} every Docker Hub image; a rule that names docker.io, such as ^docker\\.io/, is"
                    f" matched against canonical names too"]
    text = _exact_text(rule.regex)
    if text is None or any(_seen_by(rule, candidate) for candidate in {text, text.lower()}):
        return []
    flags = _inline_flags(rule)
    try:
        reference = parse_reference(text.lower() if rule.regex.flags & re.IGNORECASE else text)
    except InvalidReference:
        return [f"{rule}: never matches: no image reference is spelled {text}"]
    seen = reference.canonical if rule.canonical else reference.familiar
    name = reference.repository if rule.canonical else reference.familiar_repository
    return [f"{rule}: never matches: every image reference has a tag or digest, and {text} is matched as {seen};"
            f" use {flags}^{_escaped(seen)}$ for that tag, or {_name_fix(flags, name)}"]


def _name_warnings(policy: Policy, rule: Rule) -> list[str]:
    """Images a whitelist rule allows whose names its author did not mean, for each text it may begin with."""
    warnings: list[str] = []
    for text, wildcards in _leading_texts(rule.regex):
        warnings += [warning for warning in _text_warnings(policy, rule, text, wildcards) if warning not in warnings]
    return warnings


def _text_warnings(policy: Policy, rule: Rule, text: str, wildcards: tuple[int, ...]) -> list[str]:
    """Images a whitelist rule allows, beginning with text, whose names its author did not mean."""
    flags = _inline_flags(rule)
    warnings = []
    for position in wildcards:
        example = _dot_example(policy, rule, text, position)
        if example:
            warnings.append(f"{rule}: allows {example}: an unescaped . matches any character; escape the dots:"
                            f" {_escape_dots(rule.pattern)}")
            break
    found: dict[str, tuple[str, Reference]] = {}
    for suffix in _NAME_PROBES:
        example = text + suffix.format(port="5000" if text.endswith(":") else "0")
        reference = _allowed_by(policy, rule, example)
        kind = _overreach(rule, reference, len(text)) if reference else None
        if reference and kind:
            found.setdefault(kind, (example, reference))
    if "name" in found:
        example, _ = found["name"]
        warnings.append(f"{rule}: allows {example}, another name that begins with {text}; end the name, e.g."
                        f" {_name_fix(flags, text)}")
    elif "port" in found:   # (the fix for a name also ends the rule at the tag)
        example, reference = found["port"]
        tag = _escaped(text) + ("" if ":" in text else ":")
        warnings.append(f"{rule}: allows {example}, an image from the registry {reference.domain}, not a tag of"
                        f" {reference.domain.partition(':')[0]}; end the rule at the tag, e.g. {flags}^{tag}[^/]*$"
                        " (a tag has no /)")
    return warnings


def _futile_warning(policy: Policy, rule: Rule, bases: list[str]) -> str:
    """With defaultAllow false, a blacklist rule only renames the reason for a deny."""
    why = (f"{rule} can never change a decision: defaultAllow is false, so what no whitelist rule allows is"
           " denied anyway")
    refused = None
    for example in _blacklist_examples(rule, bases):
        try:
            reference = parse_reference(example)
        except InvalidReference:
            continue
        spellings = (reference, reference.alias) if reference.alias else (reference,)
        if not any(rule.search(form) for spelling in spellings for form in _forms_seen(rule, spelling)):
            continue
        verdict = policy.evaluate(reference)
        if verdict.allow and not rule.search(""):
            allowed = verdict.decided_by
            assert isinstance(allowed, Rule), "a verdict of the rules alone"
            narrowed = f"{allowed.pattern}(?!{_escaped(reference.tag)}$)" if (
                allowed.only_prefix and reference.tag and allowed.prefix is not None
                and allowed.prefix.endswith(":") and reference.familiar == allowed.prefix + reference.tag) \
                else "a lookahead (?!…)"
            return (f"{why}, and what one allows is allowed whatever the blacklist says: {example} is allowed by"
                    f" {allowed}; narrow that rule so that it does not allow {example}, e.g. with {narrowed},"
                    " and remove this one")
        if refused is None and not verdict.allow:
            refused = example
    return f"{why} ({refused} is denied with or without it); remove it" if refused else f"{why}; remove it"


def _blacklist_examples(rule: Rule, bases: list[str]) -> list[str]:
    """Names a blacklist rule may match, from its own leading text or, when
    it has none (:latest$), from the whitelist rules' (bases)."""
    text, _ = _leading_text(rule.regex)
    if text:   # what it matches starts with text
        examples = [text + suffix for suffix in _tags_after(text)]
        examples += [base + suffix for base in bases if base.startswith(text) for suffix in _tags_after(base)]
    else:
        plain = re.sub(r"\\(.)", r"\1", rule.pattern.lstrip("^").rstrip("$"))   # the pattern read as plain text
        examples = [name for base in bases for name in (base.rstrip(":@/") + plain, base + plain.lstrip(":@/"),
                                                        *(base + suffix for suffix in _tags_after(base)))]
    return list(dict.fromkeys(examples + list(_SAMPLE_IMAGES)))


def _tags_after(text: str) -> tuple[str, ...]:
    return ("latest", "1") if text.endswith(":") else (":latest", ":1", "/a:1", "a:1", "")


def _seen_by(rule: Rule, text: str) -> bool:
    """Whether a rule matches text as some image reference's form."""
    for name in (text, _pinned(text)):
        try:
            reference = parse_reference(name)
        except InvalidReference:
            continue
        if any(rule.search(form) for form in _forms_seen(rule, reference)):
            return True
    return False


def _pinned(text: str) -> str:
    """The name pinned by digest whose form the original plugin saw begins as text does (nginx:sha256:…)."""
    match = _DIGEST_AS_TAG_RE.search(text)
    if not match:
        return ""
    padding = "0" * (_DIGEST_LENGTHS[match["algorithm"]] - len(match["hex"]))
    return f"{text[:match.start()]}@{match['algorithm']}:{match['hex']}{padding}"


def _forms_seen(rule: Rule, reference: Reference) -> tuple[str, ...]:
    return reference.all_forms if rule.canonical else reference.familiar_forms


def _allowed_by(policy: Policy, rule: Rule, text: str) -> Reference | None:
    """The reference text names, if this very rule is what allows it."""
    try:
        reference = parse_reference(text)
    except InvalidReference:
        return None
    verdict = policy.evaluate(reference)
    return reference if verdict.allow and verdict.decided_by is rule else None


def _overreach(rule: Rule, reference: Reference, length: int) -> str | None:
    """Whether a rule's leading text (of this length) ends inside the name it
    matched: "port" when a tag it meant is read as a registry's port, "name"
    when the name merely begins with it."""
    form = next((form for form in _forms_seen(rule, reference) if rule.search(form)), None)
    if form is None:
        return None
    name = reference.familiar_repository if form in reference.familiar_forms else reference.repository
    if length >= len(name) or "/" in form[length - 1:length + 1]:
        return None
    host, colon, _ = reference.domain.partition(":")
    in_domain = name.startswith(reference.domain + "/") and len(host) <= length <= len(reference.domain)
    return "port" if in_domain and colon and "." not in host and host != "localhost" else "name"


def _dot_example(policy: Policy, rule: Rule, text: str, position: int) -> str | None:
    """An image the rule allows because the dot at position matches another character."""
    for replacement in "-x":
        for tail in ("/evil/miner", "evil/miner", "", "1"):
            example = text[:position] + replacement + text[position + 1:] + tail
            try:
                meant = parse_reference(text + tail)
            except InvalidReference:
                continue
            reference = _allowed_by(policy, rule, example)
            if reference and reference.repository != meant.repository:
                return example
    return None


def _name_fix(flags: str, name: str) -> str:
    """Rules for a repository name (or a registry) that end where the name ends."""
    rule = flags + "^" + _escaped(name)
    first = name.split("/", 1)[0]
    if "/" not in name and (any(c in first for c in ".:") or first == "localhost"):
        return f"{rule}/ for the repositories on that registry"
    if "/" not in name:
        return f"{rule}:[^/]*$ for its tags and digests, or {rule}/ for the repositories under it"
    return f"{rule}[:@] for its tags and digests, or {rule}/ for the repositories under it"


def _escaped(text: str) -> str:
    """text as a pattern: re.escape would also escape - and /, which rules do not need."""
    return re.sub(r"[.^$*+?{}\[\]\\|()]", r"\\\g<0>", text)


def _inline_flags(rule: Rule) -> str:
    match = INLINE_FLAGS_RE.match(rule.pattern)
    return match[0] if match else ""


def _escape_dots(pattern: str) -> str:
    return _DOT_RE.sub(lambda match: "\\." if match["dot"] else match[0], pattern)


def _leading_texts(regex: re.Pattern[str]) -> list[tuple[str, tuple[int, ...]]]:
    """Each text a match of a ^-anchored pattern may start with, through alternatives (^(nginx|redis)), "."
    where any character may stand (and those positions)."""
    if regex_parser is None:
        return []
    items = list(regex_parser.parse(regex.pattern, regex.flags))
    if not items or items[0] not in ((regex_parser.AT, regex_parser.AT_BEGINNING),
                                     (regex_parser.AT, regex_parser.AT_BEGINNING_STRING)):
        return []
    return [found for found in _texts(items[1:], "", ())[:50] if found[0]]


def _texts(items: list[Any], text: str, wildcards: tuple[int, ...]) -> list[tuple[str, tuple[int, ...]]]:
    for position, (op, value) in enumerate(items):
        if op is regex_parser.ANY:
            wildcards += (len(text),)
            text += "."
        elif op is regex_parser.LITERAL:
            text += chr(value)
        elif _either_case(op, value):
            text += _either_case(op, value)
        elif op is regex_parser.BRANCH or op is regex_parser.SUBPATTERN:
            inner = list(value[-1])
            branches = value[1] if op is regex_parser.BRANCH else \
                inner[0][1][1] if len(inner) == 1 and inner[0][0] is regex_parser.BRANCH else [inner]
            found: list[tuple[str, tuple[int, ...]]] = []
            for branch in branches[:50]:
                found += _texts(list(branch) + items[position + 1:], text, wildcards)
            return found
        else:
            break
    return [(text, wildcards)]


def _leading_text(regex: re.Pattern[str]) -> tuple[str, tuple[int, ...]]:
    """The characters every match of a ^-anchored pattern starts with, "."
    where any character may stand (and those positions); ("", ()) if none."""
    if regex_parser is None:
        return "", ()
    parsed = regex_parser.parse(regex.pattern, regex.flags)
    items = list(parsed)
    if not items or items[0] not in ((regex_parser.AT, regex_parser.AT_BEGINNING),
                                     (regex_parser.AT, regex_parser.AT_BEGINNING_STRING)):
        return "", ()
    text: list[str] = []
    wildcards = []
    for op, value in items[1:]:
        if op is regex_parser.ANY:
            wildcards.append(len(text))
            text.append(".")
        elif op is regex_parser.LITERAL:
            text.append(chr(value))
        elif _either_case(op, value):
            text.append(_either_case(op, value))
        else:
            break
    return "".join(text), tuple(wildcards)


def _either_case(op: Any, value: Any) -> str:
    """The letter, in lower case, of a set that is one letter in either case ([Nn], as (?i)n is written)."""
    if op is not regex_parser.IN or any(member_op is not regex_parser.LITERAL for member_op, _ in value):
        return ""
    letters = "".join(sorted(chr(member) for _, member in value if member < 128))
    return letters[1] if len(letters) == 2 and letters[0].isupper() and letters[0].lower() == letters[1] else ""


def _exact_text(regex: re.Pattern[str]) -> str | None:
    """The one text a pattern such as ^nginx$ matches, if it is one."""
    if regex_parser is None:
        return None
    items = list(regex_parser.parse(regex.pattern, regex.flags))
    if (len(items) < 2 or items[0] not in ((regex_parser.AT, regex_parser.AT_BEGINNING),
                                           (regex_parser.AT, regex_parser.AT_BEGINNING_STRING))
            or items[-1] not in ((regex_parser.AT, regex_parser.AT_END),
                                 (regex_parser.AT, regex_parser.AT_END_STRING))
            or any(op is not regex_parser.LITERAL for op, _ in items[1:-1])):
        return None
    return "".join(chr(value) for _, value in items[1:-1])


# --------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------

def parse_addr(text: str) -> AdminAddress:
    if text.startswith("unix:"):
        path = text[len("unix:"):]
        if not path.startswith("/"):
            raise ValueError(f"expected unix:/ABSOLUTE/PATH, not {text!r}")
        return path
    host, colon, port = text.rpartition(":")
    if not colon or not port.isdigit() or not host:
        raise ValueError(f"expected HOST:PORT or unix:PATH, not {text!r}")
    if int(port) > 65535:
        raise ValueError(f"port {port} is out of range (0 to 65535; 0 picks a free one)")
    return host.strip("[]"), int(port)


# The original plugin's flags (Go's flag package: -name, --name, -name=value),
# as this plugin spells them; None where it has no equivalent.
ORIGINAL_FLAGS = MappingProxyType({
    "config": "--config", "addr": "--addr", "host": "--docker-host", "debug": "--log-level=debug",
    "version": "--original-version",
    "cert-path": None, "tls-verify": None,
})


def translate_original_flags(argv: list[str]) -> list[str]:
    """Accept the original plugin's single-dash flags with their old meaning, or say what replaced them."""
    translated = []
    for arg in argv:
        name, equals, value = arg.lstrip("-").partition("=")
        if not arg.startswith("-") or arg.startswith("--") or name not in ORIGINAL_FLAGS:
            translated.append(arg)
            continue
        replacement = ORIGINAL_FLAGS[name]
        if replacement is None:
            raise ValueError(f"-{name} is the original plugin's TLS option for a remote Docker host, which this"
                             " plugin does not support: use --docker-host unix:///var/run/docker.sock (or"
                             " tcp://HOST:PORT on a trusted network)")
        if name in ("debug", "version"):   # Go's boolean flags: -debug, -debug=true, -debug=false
            if value.lower() not in ("", "1", "t", "true"):
                continue
            translated.append(replacement)
        else:
            translated.append(replacement + equals + value)
    return translated


def report_policy_tests(policy: Policy, path: str) -> bool:
    """--validate: print each failing test of the policy's own, and the same error the daemon gives."""
    failures = policy_test_failures(policy)
    for failure in failures:
        print(f"fail: {failure}")
    if failures:
        print(f"{PLUGIN_NAME}: error: {PolicyTestsFailed(path, failures, len(policy.tests))}", file=sys.stderr)
    elif policy.tests:
        print(f"{path}: the test passes" if len(policy.tests) == 1 else f"{path}: all {len(policy.tests)} tests pass")
    return not failures


def scan_command(policy: Policy, docker_host: str, output: str) -> int:
    try:
        scan = scan_host(policy, DockerAPI(docker_host, SCAN_TIMEOUT))
    except ImagePolicyError as error:
        print(f"{PLUGIN_NAME}: error: cannot scan: {error}", file=sys.stderr)
        return 2
    return print_scan(policy, scan, output)


def replay_command(policy: Policy, source: str, output: str) -> int:
    try:
        if source == "-":
            replay = replay_log(policy, sys.stdin)
        else:
            with open(source, encoding="utf-8", errors="replace") as lines:
                replay = replay_log(policy, lines)
    except OSError as error:
        print(f"{PLUGIN_NAME}: error: cannot read the decision log: {error}", file=sys.stderr)
        return 2
    return print_replay(policy, source, replay, output)


def registry_signatures(credentials_path: str | None, docker: DockerAPI | None) -> RegistrySignatures:
    """How the daemon, --check and --scan check signedBy: ConfigError for a credentials file that cannot be used."""
    return RegistrySignatures(docker, load_credentials(credentials_path) if credentials_path else MappingProxyType({}))


def serve(args: argparse.Namespace, address: AdminAddress) -> int:
    # Signals are taken by sigwait() in the main thread only: block them
    # before any thread starts, as threads inherit the mask.
    handled = {signal.SIGHUP, signal.SIGTERM, signal.SIGINT}
    signal.pthread_sigmask(signal.SIG_BLOCK, handled)
    log = Log(args.log_level, decisions=args.log_decisions)
    log.buffer(LOG_FLUSH_INTERVAL)
    try:
        return serve_plugin(args, address, log, handled)
    finally:
        log.flush(timeout=5.0)   # a stalled stderr does not keep the plugin from stopping


def serve_plugin(args: argparse.Namespace, address: AdminAddress, log: Log, handled: set[signal.Signals]) -> int:
    try:
        plugin = Plugin(args.config, load_tested_policy, log, DockerAPI(args.docker_host), args.mode,
                        registry_signatures(args.registry_auth, DockerAPI(args.docker_host)))
    except ConfigError as error:
        log.event("error", str(error))
        return 2
    try:
        plugin_server = PluginServer(args.socket, plugin)
    except (ImagePolicyError, OSError) as error:
        why = " (the plugin socket needs root)" if isinstance(error, PermissionError) and os.geteuid() else ""
        log.event("error", f"cannot serve the plugin socket {args.socket}: {error}{why}")
        return 1
    threading.Thread(target=plugin_server.serve_forever, daemon=True).start()
    plugin.admin.address = args.addr
    stopping = threading.Event()
    admin_server = bind_admin(address, plugin)
    threading.Thread(target=serve_admin, args=(address, plugin, admin_server, stopping), daemon=True).start()
    policy = plugin.policy
    admin = f"admin on {plugin.admin.address}" if plugin.admin.listening else \
        f"admin listener not bound on {plugin.admin.address} (retrying)"
    log.event("info", f"{PLUGIN_NAME} {__version__} serving {args.socket}, {admin}, policy"
              f" {args.config} ({policy.summary()}{' set by --mode' if args.mode else ''}, sha256"
              f" {policy.sha256[:12]})")
    for warning in startup_warnings():
        log.event("warning", warning)
    notify_systemd("READY=1", log)
    while True:
        signum = signal.sigwait(handled)
        if signum != signal.SIGHUP:
            break
        notify_systemd("RELOADING=1", log)
        plugin.reload()
        notify_systemd("READY=1", log)
    notify_systemd("STOPPING=1", log)
    stopping.set()
    plugin_server.shutdown()
    plugin_server.server_close()
    if plugin.admin.server is not None:
        plugin.admin.server.shutdown()
        plugin.admin.server.server_close()
    log.event("info", f"stopped on {signal.Signals(signum).name}")
    return 0


def health_command(socket_path: str) -> int:
    """--health: ask the plugin socket, then check that the admin listener it names is its own."""
    connection = _UnixHTTPConnection(socket_path, DOCKER_API_TIMEOUT)
    try:
        connection.request("POST", HEALTH_ENDPOINT, body=b"")
        status = json.loads(connection.getresponse().read())
        admin = status["admin"]
    except (OSError, ValueError, KeyError, TypeError, http.client.HTTPException) as error:
        print(f"unhealthy: the plugin socket {socket_path} does not answer: {error}")
        return 1
    finally:
        connection.close()
    plugin = f"the plugin answers on {socket_path} (policy {status['policy']['sha256'][:12]}, {status['mode']})"
    if not admin["listening"]:
        print(f"unhealthy: {plugin}, but its admin listener is not bound on {admin['address']} after"
              f" {admin['failedBinds']} failed binds ({admin['lastError']}): another process may hold the address")
        return 1
    try:
        found = admin_status(admin["address"])
    except (OSError, http.client.HTTPException) as error:
        print(f"unhealthy: {plugin}, but its admin listener on {admin['address']} does not answer: {error}")
        return 1
    if found.get("instance") != status["instance"]:
        print(f"unhealthy: {plugin}, but the admin listener on {admin['address']} is not the plugin's")
        return 1
    print(f"healthy: {plugin}; its admin listener is on {admin['address']}")
    return 0


def admin_status(address: str) -> dict[str, Any]:
    """GET /status from an admin listener at address, as --addr spells it; {} if it is no JSON object."""
    if address.startswith("unix:"):
        connection: http.client.HTTPConnection = _UnixHTTPConnection(address[len("unix:"):], DOCKER_API_TIMEOUT)
    else:
        host, port = parse_addr(address)   # type: ignore[misc]
        connection = http.client.HTTPConnection(host, port, timeout=DOCKER_API_TIMEOUT)
    try:
        connection.request("GET", "/status")
        try:
            found = json.loads(connection.getresponse().read())
        except ValueError:
            return {}
        return found if isinstance(found, dict) else {}
    finally:
        connection.close()


# The modes, one at a time (none: serve dockerd), in the order a conflict names them.
MODE_FLAGS = ("--check", "--validate", "--scan", "--replay", "--health")


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # argparse names two exclusive flags in the order given; say it the same way whatever the order.
        conflict = re.fullmatch(r"argument (\S+): not allowed with argument (\S+)", message)
        if conflict and all(flag in MODE_FLAGS for flag in conflict.groups()):
            message = " and ".join(sorted(conflict.groups(), key=MODE_FLAGS.index)) + " cannot be combined"
        super().error(message)


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog=PLUGIN_NAME, description="Docker authorization plugin that allows only approved images.")
    parser.add_argument("--config", metavar="PATH", default=DEFAULT_CONFIG,
                        help="policy file (default: %(default)s)")
    parser.add_argument("--socket", metavar="PATH", default=DEFAULT_SOCKET,
                        help="plugin socket; its name is the plugin's name for dockerd (default: %(default)s)")
    parser.add_argument("--addr", metavar="HOST:PORT", default=DEFAULT_ADDR,
                        help="admin listener for /health, /config, /version, /status, /metrics; unix:PATH for a"
                             " socket only root can use (default: %(default)s)")
    parser.add_argument("--docker-host", metavar="URL",
                        help=f"Docker API used to look up image IDs, and read by --scan (default: {DEFAULT_DOCKER_HOST})")
    parser.add_argument("--registry-auth", metavar="FILE",
                        help="registry credentials for signedBy checks, in docker's config.json format (auths);"
                             " dockerd does not pass its pulls' credentials to the plugin (default: none,"
                             " anonymous)")
    parser.add_argument("--mode", metavar="MODE", choices=sorted(MODES),
                        help="enforce or audit, in place of the policy's \"mode\" (which reloads do not change);"
                             " for a first rollout in audit mode whatever the file says")
    parser.add_argument("--log-level", metavar="LEVEL", default="info", choices=list(LOG_LEVELS), type=str.lower,
                        help="debug, info, warning or error (default: %(default)s)")
    parser.add_argument("--log-decisions", metavar="WHICH", default="all", choices=DECISION_LOGGING,
                        help="decisions the decision log keeps: all (image decisions and every deny), denies"
                             " (denies and would-denies only) or none (default: %(default)s)")
    modes = parser.add_mutually_exclusive_group()
    modes.add_argument("--check", metavar="IMAGE", nargs="*",
                       help="print the decision for each image (none for an operation that names no image) and"
                            " exit: 0 all allowed, 1 any denied, 2 bad config")
    modes.add_argument("--validate", action="store_true",
                       help="check the configuration, print warnings, run its tests, exit 0 (valid) or 2 (invalid)")
    modes.add_argument("--scan", action="store_true",
                       help="judge every image, container and service on --docker-host and print what the policy"
                            " refuses: exit 0 nothing, 1 something, 2 bad config or unreachable daemon")
    modes.add_argument("--replay", metavar="FILE",
                       help="decide the decision log lines in FILE (- for stdin) again under --config and print"
                            " what would change: exit 0 nothing, 1 something, 2 bad config, unreadable FILE or"
                            " no decision in it")
    modes.add_argument("--health", action="store_true",
                       help="ask the running plugin on --socket whether it serves, and whether the admin listener"
                            " is its own: exit 0 healthy, 1 not")
    parser.add_argument("--operation", metavar="OPERATION", choices=tuple(COMMANDS),
                        help="what --check judges: " + ", ".join(COMMANDS) + " (default: pull); --check"
                             " looks a run by image ID up only on an explicit --docker-host")
    parser.add_argument("--tag-target", metavar="NAME", help="the new name, for --check --operation tag")
    parser.add_argument("--caller", metavar="SELECTOR", action="append",
                        help="judge --check as this caller: cn:NAME, o:NAME, ou:NAME (repeat to combine) or"
                             " unidentified (default: unidentified, as on the unix socket)")
    parser.add_argument("--at", metavar="TIME",
                        help="judge --check at this date (2027-01-31) or RFC 3339 time instead of now")
    parser.add_argument("--strict", action="store_true",
                        help="with --validate: exit 1 when there is any warning, as CI checks before a rollout")
    parser.add_argument("--format", metavar="FORMAT", choices=("text", "json"), default="text",
                        help="output of --check, --scan and --replay: text or json (default: %(default)s)")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--original-version", action="version", version=f"Version: {__version__}",
                        help=argparse.SUPPRESS)   # the original plugin's -version
    return parser


def check_arguments(parser: ArgumentParser, args: argparse.Namespace) -> AdminAddress:
    """Refuse flags that do not go together (parser.error exits 2); the admin address --addr gives."""
    if (args.operation or args.tag_target or args.caller or args.at) and args.check is None:
        parser.error("--operation, --tag-target, --caller and --at go with --check")
    try:
        args.caller = caller_of_selectors(args.caller or [])
    except ValueError as error:
        parser.error(f"--caller: {error}")
    at = parse_time(args.at) if args.at else None
    if args.at and at is None:
        parser.error(f"--at: expected a date (2027-01-31) or an RFC 3339 time with its zone, not {args.at!r}")
    args.at = at
    args.operation = COMMANDS[args.operation or PULL.command]
    if (args.operation is TAG) != (args.tag_target is not None):
        parser.error("--tag-target NAME goes with --operation tag, and --operation tag needs it")
    if args.check is not None and args.operation.opaque == bool(args.check):
        parser.error(f"--check: a {args.operation} names no image" if args.check else
                     "--check needs at least one IMAGE")
    if args.format != "text" and not (args.check is not None or args.scan or args.replay is not None):
        parser.error("--format goes with --check, --scan or --replay")
    if args.strict and not args.validate:
        parser.error("--strict is valid only with --validate")
    if args.registry_auth and (args.validate or args.replay is not None or args.health):
        parser.error("--registry-auth goes with serving, --check or --scan: the others ask no registry")
    try:
        address = parse_addr(args.addr)
    except ValueError as error:
        parser.error(f"--addr: {error}")
    docker_host = args.docker_host or DEFAULT_DOCKER_HOST
    if not docker_host.startswith(("unix://", "tcp://")):
        parser.error(f"--docker-host: expected unix://PATH or tcp://HOST:PORT, not {docker_host!r}")
    return address


def check_command(policy: Policy, args: argparse.Namespace) -> int:
    """--check: judged as --caller at --at; a run by image ID is looked up only on an explicit --docker-host."""
    policy = dataclasses.replace(policy.asked_by(args.caller), at=args.at)
    docker = DockerAPI(args.docker_host) if args.docker_host is not None else NO_DAEMON
    return check_operation(policy, args.operation, args.check or [""], args.tag_target or "", docker, args.format)


def validate_command(policy: Policy, args: argparse.Namespace) -> int:
    """--validate: the warnings, then the policy's own tests; with --strict a warning fails too."""
    warnings = [*policy.notes, *filter(None, [go_era_warning(policy)]), *scope_warnings(policy, time.time()),
                *policy_warnings(policy)]
    for warning in warnings:
        print(f"warning: {warning}")
    if not report_policy_tests(policy, args.config):
        return 2
    print(f"{args.config}: valid, {policy.summary()}")
    return 1 if args.strict and warnings else 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        argv = translate_original_flags(sys.argv[1:] if argv is None else argv)
    except ValueError as error:
        parser.error(str(error))
    args = parser.parse_args(argv)
    address = check_arguments(parser, args)
    if args.health:
        return health_command(args.socket)
    docker_host = args.docker_host or DEFAULT_DOCKER_HOST   # --check asks dockerd only when given one
    if args.check is None and not (args.validate or args.scan or args.replay is not None):
        args.docker_host = docker_host
        return serve(args, address)
    try:
        policy = load_policy(args.config)
        if args.check is not None or args.scan:   # signedBy is checked at the registry, as the daemon checks it
            policy = policy.judged_with(registry_signatures(
                args.registry_auth, DockerAPI(docker_host) if args.docker_host or args.scan else None))
    except ConfigError as error:
        print(f"{PLUGIN_NAME}: error: {error}", file=sys.stderr)
        return 2
    if args.mode:
        policy = dataclasses.replace(policy, mode=args.mode)
    if args.check is not None:
        return check_command(policy, args)
    if args.scan:
        return scan_command(policy, docker_host, args.format)
    if args.replay is not None:
        return replay_command(policy, args.replay, args.format)
    return validate_command(policy, args)


if __name__ == "__main__":
    sys.exit(main())
