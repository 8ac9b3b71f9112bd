"""Tests for docker_image_policy, grouped by the module's sections, then by how it is operated.

    python3 -m unittest -v test_docker_image_policy

The end-to-end classes start a real registry and real dockerd engines (20.10
from the machine; 26.1 from Debian trixie; 28.5 from Debian sid, with the
classic and with the containerd image store) and drive them with two docker
CLIs (the machine's 20.10 and sid's 28.5). They need root, dockerd,
docker-registry, busybox and the machine's Debian archive (engines and CLI are
downloaded once), and skip with a message when something is missing, unless
DOCKER_IMAGE_POLICY_REQUIRE_E2E=1 (set by CI) makes that a failure.
DOCKER_IMAGE_POLICY_LONG=1 runs the fuzz and soak tests at ten times the size
(the indexed-lookup differential at its full twenty policies). Each engine
also measures how long a docker CLI call waits while the plugin is down.
TestFleet and the journal and Prometheus tests run ansible-playbook,
promtool, prometheus, systemd-journal-remote and journalctl on the README's
own blocks.

    python3 test_docker_image_policy.py benchmark

measures the plugin against the Go peer (see README.md, Performance).
"""

from __future__ import annotations

import ast
import base64
import bisect
import calendar
import contextlib
import dataclasses
import datetime
import hashlib
import functools
import http.client
import io
import itertools
import json
import math
import os
import random
import re
import shutil
import signal
import socket
import socketserver
import stat
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import unittest
import zlib
from types import MappingProxyType
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest import mock
from urllib.parse import quote, urlsplit

import docker_image_policy as dip
from docker_image_policy import InvalidReference, parse_reference, pull_reference

HERE = Path(__file__).resolve().parent
MODULE = HERE / "docker_image_policy.py"
LONG = os.environ.get("DOCKER_IMAGE_POLICY_LONG") == "1"
REQUIRE_E2E = os.environ.get("DOCKER_IMAGE_POLICY_REQUIRE_E2E") == "1"
UNIT_ONLY = os.environ.get("DOCKER_IMAGE_POLICY_UNIT_ONLY") == "1"
DIGEST = "sha256:" + "a" * 64

# A policy in the original plugin's format: whitelist, blacklist and defaultAllow only.
ORIGINAL_CONFIG = {
    "whitelist": ["^nginx:", "^docker:", "^quay\\.io/calico/node"],
    "blacklist": ["^ubuntu:"],
    "defaultAllow": False,
}

# The original plugin's README example (and config-example.json), as written there.
ORIGINAL_README_CONFIG = """{
  "whitelist": [
    "^alpine:",
    "^docker\\\\.elastic\\\\.co/beats/filebeat:",
    "^gcr\\\\.io/google_containers",
    "^mysql:",
    "^nginx:",
    "^php:",
    "^apache:",
    "^quay\\\\.io/calico/cni",
    "^quay\\\\.io/calico/node",
    "^quay\\\\.io/coreos/flannel"
  ],
  "blacklist": [
    "^docker:"
  ],
  "defaultAllow": false
}
"""


def policy_of(config: dict[str, Any]) -> dip.Policy:
    return dip.compile_policy(json.dumps(config), "test.json")


def policy_of_text(text: str) -> dip.Policy:
    return dip.compile_policy(text, "test.json")


def authz(method: str, uri: str, body: Any = None, headers: dict[str, str] | None = None,
          **extra: Any) -> dict[str, Any]:
    """An AuthZReq as dockerd builds it."""
    request: dict[str, Any] = {"RequestMethod": method, "RequestUri": uri,
                               "RequestHeaders": dict(headers or {})}
    if body is not None:
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        request["RequestBody"] = base64.b64encode(raw).decode()
        request["RequestHeaders"].setdefault("Content-Type", "application/json")
        request["RequestHeaders"].setdefault("Content-Length", str(len(raw)))
    request.update(extra)
    return request


def pull(uri: str) -> dict[str, Any]:
    """A pull as the docker CLI sends it (text/plain, empty body)."""
    return authz("POST", uri, headers={"Content-Type": "text/plain", "Content-Length": "0"})


class FakeDocker(dip.Docker):
    """A daemon's answers, stated by the test: the images each looked-up text
    resolves to, and its services. Nothing is resolved here: a lookup the test
    did not state fails it, and looked_up records what was asked."""

    def __init__(self, lookups: dict[str, list[dip.LocalImage]] | None = None,
                 services: dict[str, dict[str, Any]] | None = None) -> None:
        self.lookups, self.services = dict(lookups or {}), services or {}
        self.looked_up: list[str] = []

    def images_for(self, text: str) -> list[dip.LocalImage]:
        self.looked_up.append(text)
        if text not in self.lookups:
            raise AssertionError(f"unexpected Docker API lookup of {text}")
        return list(self.lookups[text])

    def service(self, name: str) -> dict[str, Any]:
        if name not in self.services:
            raise dip.ImagePolicyError(f"no such service {name!r}")
        return self.services[name]


class NoDocker(FakeDocker):
    def service(self, name: str) -> dict[str, Any]:
        raise AssertionError(f"unexpected Docker API lookup of service {name}")


NO_DOCKER = NoDocker()
ENFORCE = dip.compile_policy("{}", "enforce.json")


class AnyNameIsNoImage(dip.Docker):
    """A daemon without images: every name is pulled, never resolved as an ID."""

    def images_for(self, text: str) -> list[dip.LocalImage]:
        return []


# --------------------------------------------------------------------------
# Image references
# --------------------------------------------------------------------------

class TestReference(unittest.TestCase):
    def test_protocol_table(self):
        table = {
            "ubuntu": "docker.io/library/ubuntu:latest",
            "library/ubuntu": "docker.io/library/ubuntu:latest",
            "docker.io/ubuntu": "docker.io/library/ubuntu:latest",
            "index.docker.io/ubuntu": "docker.io/library/ubuntu:latest",
            "user/app:1": "docker.io/user/app:1",
            "localhost:5000/app": "localhost:5000/app:latest",
            "myreg:5000/a/b": "myreg:5000/a/b:latest",
            "[::1]:5000/app": "[::1]:5000/app:latest",
            "localhost:5000": "docker.io/library/localhost:5000",
            f"ubuntu:22.04@{DIGEST}": f"docker.io/library/ubuntu:22.04@{DIGEST}",
            f"ubuntu@{DIGEST}": f"docker.io/library/ubuntu@{DIGEST}",
            "LOCALHOST:5000/x": "localhost:5000/x:latest",
            "LOCALHOST/x": "localhost/x:latest",   # an upper-case first component is a registry: the same host
            "docker.io/library/team/app:1": "docker.io/library/team/app:1",
            "Quay.IO/calico/node:v3": "quay.io/calico/node:v3",
        }
        for text, canonical in table.items():
            with self.subTest(text):
                self.assertEqual(parse_reference(text).canonical, canonical)

    def test_localhost_is_a_registry_without_a_port(self):
        # distribution/reference reads "localhost" as a domain however it stands: never a Docker Hub user.
        for text, canonical in [("localhost/evil:1", "localhost/evil:1"), ("localhost/team/app", "localhost/team/app:latest"),
                                ("localhostx/app:1", "docker.io/localhostx/app:1")]:
            with self.subTest(text):
                self.assertEqual(parse_reference(text).canonical, canonical)
        policy = policy_of({"whitelist": ["^docker\\.io/"], "defaultAllow": False})
        verdict = policy.evaluate(parse_reference("localhost/evil:1"))
        self.assertEqual((verdict.allow, verdict.rule), (False, "defaultAllow"))

    def test_familiar_forms(self):
        table = {
            "docker.io/library/nginx:1.25": "nginx:1.25",
            "someone/app:2": "someone/app:2",
            "quay.io/calico/node:v3": "quay.io/calico/node:v3",
            "nginx": "nginx:latest",
            f"nginx@{DIGEST}": f"nginx@{DIGEST}",
            "docker.io/library/team/app:1": "library/team/app:1",   # not team/app, another repository
        }
        for text, familiar in table.items():
            with self.subTest(text):
                self.assertEqual(parse_reference(text).familiar, familiar)

    def test_registry_aliases_are_other_names_of_one_repository(self):
        # Docker Hub answers as registry-1.docker.io and with :443 too; any registry with :443.
        for text, canonical, alias in [
            ("registry-1.docker.io/evil/miner:1", "registry-1.docker.io/evil/miner:1", "evil/miner:1"),
            ("registry.hub.docker.com/library/evil:1", "registry.hub.docker.com/library/evil:1", "evil:1"),
            ("index.docker.io:443/evil/miner:1", "index.docker.io:443/evil/miner:1", "evil/miner:1"),
            ("docker.io:443/library/nginx:1", "docker.io:443/library/nginx:1", "nginx:1"),
            ("registry-1.docker.io:443/library/nginx:1", "registry-1.docker.io:443/library/nginx:1", "nginx:1"),
            ("QUAY.IO:443/evil/x:1", "quay.io:443/evil/x:1", "quay.io/evil/x:1"),
            ("vm:443/evil:2", "vm:443/evil:2", "vm/evil:2"),          # a dotless host keeps its port
            ("127.0.0.1:0443/app:bad", "127.0.0.1:0443/app:bad", "127.0.0.1/app:bad"),   # Go reads 0443 as 443
            ("registry-1.docker.io:0443/library/nginx:1", "registry-1.docker.io:0443/library/nginx:1", "nginx:1"),
            ("localhost:80/x:1", "localhost:80/x:1", "localhost/x:1"),   # an insecure registry's HTTP port
            ("quay.io:05000/x:1", "quay.io:05000/x:1", "quay.io:5000/x:1"),
            ("[::1]:443/app:1", "[::1]:443/app:1", "[::1]/app:1"),
            ("quay.io:4430/evil/x:1", "quay.io:4430/evil/x:1", None),
            ("quay.io/evil/x:1", "quay.io/evil/x:1", None),
            ("docker.io:443/nginx", "docker.io:443/nginx:latest", "docker.io/nginx:latest"),
        ]:
            with self.subTest(text):
                reference = parse_reference(text)
                self.assertEqual((reference.canonical, reference.alias and reference.alias.familiar),
                                 (canonical, alias))
        # Only the lower-case docker.io and index.docker.io add library/: DOCKER.IO/nginx is not the
        # official nginx, and a one-component path there has no familiar form for rules to see.
        for text, canonical, familiar in [("DOCKER.IO/nginx", "docker.io/nginx:latest", ()),
                                          ("DOCKER.IO/library/nginx", "docker.io/library/nginx:latest",
                                           ("nginx:latest",))]:
            with self.subTest(text):
                reference = parse_reference(text)
                self.assertEqual((reference.canonical, reference.forms(False), reference.alias),
                                 (canonical, familiar, None))

    def test_digest_pins_have_the_original_plugins_form_too(self):
        self.assertEqual(parse_reference(f"nginx@{DIGEST}").forms(False), (f"nginx@{DIGEST}", f"nginx:{DIGEST}"))
        self.assertEqual(parse_reference(f"nginx@{DIGEST}").forms(True),
                         (f"docker.io/library/nginx@{DIGEST}", f"docker.io/library/nginx:{DIGEST}"))
        # dockerd ignores a tag beside a digest: so do the rules.
        self.assertEqual(parse_reference(f"nginx:1@{DIGEST}").forms(False), (f"nginx@{DIGEST}", f"nginx:{DIGEST}"))
        self.assertEqual(parse_reference("nginx:1").forms(True), ("docker.io/library/nginx:1",))

    def test_no_reference_is_longer_than_a_valid_one(self):
        # distribution/reference caps a whole name at 255 characters; rules never see more.
        self.assertEqual(parse_reference("a." * 124 + "io/x:1").domain, "a." * 124 + "io")
        # At the limits: a name of 255 characters, a tag of 128, a sha512 digest; one more is refused.
        name = "a." * 125 + "io/xx"
        longest = f"{name}:{'t' * 128}@sha512:{'a' * 128}"
        self.assertEqual(len(longest), dip.MAX_REFERENCE)
        self.assertEqual(parse_reference(longest).repository, name)
        with self.assertRaisesRegex(InvalidReference, "repository name longer than 255 characters"):
            parse_reference(name + "x")
        with self.assertRaisesRegex(InvalidReference, "longer than any valid reference"):
            parse_reference(longest + "a")
        for text in ["a." * 127 + "io/x:1", "a." * 100000 + "io/x:1", "x" * 300, "nginx:" + "1" * 10**6]:
            with self.subTest(len(text)), self.assertRaisesRegex(InvalidReference, "longer than"):
                parse_reference(text)

    def test_invalid_references(self):
        for text in ["Ubuntu", "foo..bar", "alpine:", "a:b:c", "a" * 64, "", "nginx@sha256:abc",
                     "nginx@md5:" + "a" * 32, "a/" + "b" * 255, "nginx:" + "t" * 129, "-nginx", "ngin x"]:
            with self.subTest(text), self.assertRaises(InvalidReference):
                parse_reference(text)


    def test_a_tag_on_a_name_read_before_is_read_as_the_whole_reference(self):
        # parse_reference reads name:tag as the name (parsed once) and the tag; the grammar reads it whole.
        domains = ["", "docker.io/", "index.docker.io/", "DOCKER.IO/", "localhost/", "localhost:5000/",
                   "Quay.io:443/", "[::1]:5000/", "h_x/", "x:1/", "registry-1.docker.io/"]
        paths = ["nginx", "library/nginx", "a/b/c", "Nginx", "a..b", "localhost", "0" * 64, "abc", "a__b",
                 "moby-dangling", "x" * 250]
        tags = ["", ":1.25", ":latest", ":u0-42", ":", ":-x", ":" + "t" * 128, ":" + "t" * 129, ":a:b", ":A_b.9-",
                ":5000", ":a/b"]
        digests = ["", f"@{DIGEST}", "@sha256:" + "c" * 63, "@md5:" + "d" * 32]

        def read(parse: Any, text: str) -> tuple[Any, ...]:
            try:
                reference = parse(text)
            except InvalidReference as error:
                return ("invalid", str(error))
            return (reference, reference.canonical, reference.familiar, reference.all_forms, reference.alias)
        fast = 0
        for domain, path, tag, digest in itertools.product(domains, paths, tags, digests):
            text = domain + path + tag + digest
            with self.subTest(text):
                whole = read(dip.parse_whole_reference, text)
                self.assertEqual(read(parse_reference.__wrapped__, text), whole)   # not what an earlier call left
                fast += whole[0] != "invalid" and bool(tag) and not digest
        self.assertGreater(fast, 300)   # name:tag, valid: what the quick reading reads
    def test_pull_tag_replaces_tag_and_may_be_a_digest(self):
        def pulled(from_image: str, tag: str) -> tuple[str, bool]:
            reference, all_tags = pull_reference(from_image, tag)
            return reference.familiar, all_tags
        self.assertEqual(pull_reference("nginx:1.24", "1.25")[0].canonical, "docker.io/library/nginx:1.25")
        self.assertEqual(pulled("docker.io/library/nginx", "1.25"), ("nginx:1.25", False))
        self.assertEqual(pulled("nginx:1.24", DIGEST), (f"nginx@{DIGEST}", False))
        self.assertEqual(pulled(f"nginx:1@{DIGEST}", "2"), (f"nginx:2@{DIGEST}", False))
        self.assertEqual(pulled("nginx:1.25", ""), ("nginx:1.25", False))
        self.assertEqual(pulled("nginx", ""), ("nginx:latest", True))   # all tags
        self.assertEqual(pulled("nginx:", ""), ("nginx:latest", True))  # "pull -a" clients send "name:"
        self.assertEqual(pulled(f"nginx@{DIGEST}", ""), (f"nginx@{DIGEST}", False))   # a digest is one image
        for tag in ["sha256:abc", "sha256:" + "A" * 64, "md5:" + "a" * 32]:   # neither a digest nor a tag
            with self.subTest(tag), self.assertRaisesRegex(InvalidReference, "invalid tag"):
                pull_reference("nginx", tag)
        with self.assertRaises(InvalidReference):
            pull_reference("nginx", "bad:tag")


# --------------------------------------------------------------------------
# Rules: RE2 syntax, as Go's regexp reads it
# --------------------------------------------------------------------------

# Reads a line of JSON texts, then one pattern per line; answers each pattern
# with its error, or which texts regexp.MatchString matches: what the Go plugin did.
GO_REGEXP = r"""package main

import (
	"bufio"
	"encoding/json"
	"os"
	"regexp"
)

func main() {
	in := bufio.NewScanner(os.Stdin)
	in.Buffer(make([]byte, 1<<20), 1<<26)
	out := bufio.NewWriter(os.Stdout)
	defer out.Flush()
	var texts []string
	in.Scan()
	if err := json.Unmarshal(in.Bytes(), &texts); err != nil {
		panic(err)
	}
	encoder := json.NewEncoder(out)
	for in.Scan() {
		var pattern string
		if err := json.Unmarshal(in.Bytes(), &pattern); err != nil {
			panic(err)
		}
		re, err := regexp.Compile(pattern)
		if err != nil {
			encoder.Encode(map[string]any{"error": err.Error()})
			continue
		}
		matches := make([]bool, len(texts))
		for i, text := range texts {
			matches[i] = re.MatchString(text)
		}
		encoder.Encode(map[string]any{"matches": matches})
	}
}
"""

# Every construct Python's re and Go's RE2 read differently, and then some.
RE2_CORPUS = [
    "^[[:alpha:]]+:latest$", "^[[:^alpha:]]", "[[:digit:]]", "[[:^digit:]]+$", "^[[:alnum:]_./-]+:[[:digit:]]",
    "[[:upper:]]", "(?i)[[:upper:]]", "(?i)[[:^lower:]]", "[[:punct:]]{3}", "[[:word:]]+@", "[[:xdigit:]]{8}$",
    "[[:space:][:cntrl:]]", "[[:graph:]]", "[[:print:]]$", "[[:blank:]]", "[[:ascii:]]", "[^[:alpha:]]:",
    "[[:foo:]]", "[[:alpha:]", "[[:^:]]", "[[:alpha]]", "nginx\\z", ":latest\\z", "\\Anginx", "^nginx:1\\.25\\z",
    "\\Qnginx:1.25\\E$", "^\\Qquay.io/\\E", "\\Q.*", "a\\Q\\E*", "\\pL", "^\\pL+:", "\\p{L}+$", "\\PL", "\\P{L}",
    "\\p{^L}", "\\P{^L}", "\\p{Lu}", "(?i)\\p{Lu}+:", "(?i)\\P{Lu}", "\\p{Greek}", "\\p{Latin}+", "\\p{^Latin}",
    "\\p{Common}", "\\p{Nd}+$", "\\pN", "\\p{Zs}", "\\p{Any}", "\\p{Foo}", "\\p", "\\p{", "\\pZ", "[\\pL\\d]+:",
    "[^\\PL]", "(?i)nginx", "^(?i)NGINX:", "^nginx(?i):LATEST$", "^(?i:NGINX):latest$", "(?i)^nginx(?-i):LATEST",
    "^a(?i)b|c", "(?i)k", "(?i)s", "(?i)\\x{212A}", "(?i)\\x{17F}", "\\x{212A}", "(?i)[\\x{17F}]", "(?i)[^k]",
    "(?i)[k-k]", "(?i)[\\x{100}-\\x{300}]", "(?i)[a-c]+", "(?U)a+", "(?U)^nginx:.*?$", "a+?", "a*?:", "a??b",
    "(?s).", "(?s:.)+$", "(?m)^nginx", "(?m)latest$", "(?m:^a$)", "(?sm-s)", "(?i-i)a", "(?)", "(?-)", "(?i",
    "(?x)a", "(?a)", "(?P<name>nginx):", "(?P<n1>a)(?P<n1>b)", "(?P<>a)", "(?P<a-b>c)", "(?P<name", "(?<name>a)",
    "\\x{41}", "\\x{6e}ginx", "\\x6eginx", "\\x{}", "\\x{110000}", "\\x{zz}", "\\xg", "\\x", "\\101", "\\0",
    "\\08", "\\12", "\\123", "\\1234", "\\8", "\\1", "\\d+$", "\\D", "\\w+:", "\\W", "\\s", "\\S+", "\\bnginx\\b",
    "\\Bginx", "a\\b", "\\b", "\\B", "x{,3}", "^nginx{,3}:", "a{2}", "a{2,}", "a{1,3}b", "a{1000}", "a{1001}",
    "a{0,1001}", "a{2,1}", "(a{2}){600}", "(a{20}){50}", "((a{10}){10}){10}", "((a{10}){10}){11}", "a{01}",
    "a{1,}?", "a**", "a*+", "a++", "a?*", "a{2}{3}", "a{2}*", "*a", "+", "a|*", "(*)", "(?i)*", "a(?i)*", "^*$",
    "\\C", "\\Z", "\\e", "\\u0041", "\\N{LATIN SMALL LETTER A}", "\\", "a\\", "[a", "[]a]", "[^]a]", "[]", "[^]",
    "[a-]", "[-a]", "[a-b-c]", "[z-a]", "[\\d-z]", "[a\\-z]", "[\\]]", "[\\b]", "[\\x41-\\x5a]", "[[a]", "[a[]",
    "[^\\x00-\\x{10FFFF}]", "[^/]+$", "[^a]", "[.]", "(", ")", "a)", "(a", "()", "(|a)", "a|", "|", "a||b",
    "(?:)", "(?:a|b)*c", "^(nginx|redis):", "^(?:nginx|node)*:", "\\.", "\\-", "\\#", "\\&", "\\~", "\\ ", "\\:",
    "\\/", "\\_", "\\k", "\\y", "$a", "a^", "^$", "$", "^", "", ".", ".*", ".+", "\\A\\z", "(?m)^$",
    "^docker\\.io/library/", "^quay\\.io/calico/node:v3\\.[0-9]+$", "@sha256:[0-9a-f]{64}$",
    "^([a-z0-9]+[._-]?)*:1\\.", ".*/.*/.*/.*:latest$", ".*/.*/.*/.*/.*:latest$", "^(a|aa)+:", "^(\\w+)*:",
    "(((((((((((a)))))))))))", "(" * 1001 + "a" + ")" * 1001,
    "[a-\\d]", "[\\d-z]", "[--a]", "[]-a]", "[^-a]", "\\x{0041}", "\\x{00000041}", "(?i)\\W", "(?i)[^\\W]",
    "x{2}{,3}", "x{2}?", "x{2}??", "a{,}", "a{1,2,3}", "a{ 1}", "(?im-s:^a.$)", "\\pLu", "\\p{L", "[\\p{Lu}-z]",
    "[a-\\pL]", "[\\0]", "[\\1]", "(?i)[k-s]", "(?i)[^k-s]", "[[:alpha:]-z]", "[a-[:alpha:]]", "[[:alpha:]]]",
    "[[.a.]]", "[[=a=]]", "x*?*", "x+??", "(?i)\\Q K\\E", "\\Q", "\\Qab\\E\\E", "[\\Q]", "(?:a)(?i)",
    "(?i)[\\x{212A}-\\x{212B}]", "(?i)\\p{Ll}", "(?i)\\P{Ll}", "\\p{^Lu}", "\\P{^Lu}", "[\\P{L}a]", "a|b|",
    "a{1000,}", "(a{2}){500}", "(a{2}){501}", "(?:a{1000})*", "(a*){1000}", "((a{2}){2}){250}", "((a{2}){2}){251}",
    "x{0}", "x{0,0}", "(?i)\u017f", "(?i)\u212a", "\\v", "[\\v]", "\\cA",
    "^nginx:(?!latest$)[^/]+$", "^[a-z]+/(?<=/)[[:alpha:]]+:", "^([a-z]+)/\\1:",   # Python's syntax, kept
]

# What the generated patterns are made of: the pieces above, and plain text of image names.
RE2_ATOMS = [
    "a", "n", "k", "K", "s", "S", "x", "0", "1", "9", ".", "\\.", "/", ":", "@", "-", "_", "l", "t", "e", "g", "i",
    "[a-z]", "[^/]", "[0-9a-f]", "[A-Z]", "[[:alpha:]]", "[[:^digit:]]", "[[:upper:]]", "[[:punct:]]", "\\d",
    "\\w", "\\W", "\\s", "\\S", "\\D", "\\pL", "\\p{Lu}", "\\PL", "\\p{Latin}", "\\p{Greek}", "\\x{6B}", "\\x{212A}",
    "\\x{17F}", "\\Q.a\\E", "\\b", "\\B", "^", "$", "\\A", "\\z", "(?i)", "(?-i)", "(?s)", "(?m)", "(?U)", "[.-]",
    "[^a-z]", "[\\d.]", "[[:alnum:]_-]", "\\101", "\\x61", "x{,2}", "nginx", "latest", "library", "sha256",
]


class TestRE2(unittest.TestCase):
    """Rules read as Go's regexp reads them: each construct, refusals, and Go itself."""

    def verdict(self, pattern: str, image: str) -> bool:
        """Whether a blacklist of this one rule refuses the image: the decision path the daemon uses."""
        policy = policy_of({"blacklist": [pattern], "defaultAllow": True})
        return not policy.evaluate(parse_reference(image)).allow

    def refusal(self, pattern: str) -> str:
        with self.assertRaises(dip.ConfigError) as caught:
            policy_of({"blacklist": [pattern]})
        return str(caught.exception)

    def test_constructs_python_reads_differently(self):
        for pattern, refused, allowed in [
            ("^[[:alpha:]]+:latest$", ["nginx:latest", "n:latest"], ["nginx:1", "n1:latest", "quay.io/a:latest"]),
            ("[[:^digit:]]:1$", ["nginx:1"], ["a/1:1"]),
            (":[[:upper:]]", ["nginx:Latest"], ["nginx:latest"]),
            ("^nginx:latest\\z", ["nginx:latest"], ["nginx:latest1"]),
            ("\\Anginx:", ["nginx:1"], ["a/nginx:1"]),
            ("^\\Qnginx:1.2\\E", ["nginx:1.2"], ["nginx:1x2"]),
            ("^\\pL+:", ["nginx:1"], ["n1:1"]),
            (":\\p{Lu}", ["nginx:Latest"], ["nginx:latest"]),
            ("^\\PL", ["1a:1"], ["a1:1"]),
            ("\\p{Greek}", [], ["nginx:1"]),
            ("^nginx:(?i)LATEST$", ["nginx:latest", "nginx:LaTeSt"], ["NGINX.io/a:latest"]),
            ("^(?i:N)ginx:LATEST$", [], ["nginx:latest"]),
            ("(?i)^\\x{212A}afka:", ["kafka:1"], ["afka:1"]),
            ("(?i)^redi\\x{17F}:", ["redis:7"], ["redi:7"]),
            ("^(?U)nginx:.+$", ["nginx:1", "nginx"], ["a/nginx:1"]),
            ("^\\x{6e}\\x67\\151nx:", ["nginx:1"], ["ngnx:1"]),
            ("^nginx:\\d+$", ["nginx:1"], ["nginx:a"]),
            ("\\bnginx:", ["nginx:1", "a/nginx:1"], ["anginx:1"]),
            ("^nginx{,3}:", [], ["nginx:1", "nginxxx:1"]),
            ("^a.b:", ["axb:1"], ["ab:1"]),
        ]:
            for image in refused:
                with self.subTest(pattern=pattern, image=image):
                    self.assertTrue(self.verdict(pattern, image))
            for image in allowed:
                with self.subTest(pattern=pattern, image=image):
                    self.assertFalse(self.verdict(pattern, image))

    def test_rules_that_name_docker_hub_in_re2_spellings(self):
        # However a rule spells docker.io, it sees canonical names, as docker\\.io does.
        for pattern in ["^docker\\x2eio/library/nginx:", "^\\Qdocker.io\\E/library/nginx:", "^(docker)[.]io/library/nginx:",
                        "(?i)^DOCKER\\.IO/library/nginx:", "^docker\\.\\x{69}o/library/nginx:"]:
            with self.subTest(pattern):
                self.assertTrue(self.verdict(pattern, "nginx:1"))
                self.assertFalse(self.verdict(pattern, "redis:1"))
        for pattern in ["^docker", "^dockerXio/", "^[a-z]ocker\\.io/", "^docker\\.i"]:
            with self.subTest(pattern):
                self.assertFalse(dip.compile_rule("test.json", "whitelist", 0, pattern).canonical)
        # A blacklist rule also sees canonical names, unless it would refuse every Docker Hub image by them.
        for pattern, canonical in [("^docker", False), ("^d", False), ("library", True), ("/library/", True),
                                   ("\\.io/badorg/", True),
                                   ("/library/evil", True), ("^[a-z.]+/library/miner", True), ("^dockerXio/", True)]:
            with self.subTest(pattern):
                self.assertEqual(dip.compile_rule("test.json", "blacklist", 0, pattern).canonical, canonical)
        policy = policy_of({"blacklist": ["\\.io/badorg/", "/library/evil", "^[a-z.]+/library/miner"],
                            "defaultAllow": True})
        for image, allow in [("docker.io/badorg/tool:1", False), ("badorg/tool:1", False), ("evil:1", False),
                             ("miner:1", False), ("nginx:1", True), ("quay.io/badorg/x:1", False)]:
            with self.subTest(image):
                self.assertEqual(policy.evaluate(parse_reference(image)).allow, allow)

    def test_a_rule_too_large_to_match_in_bounded_time_is_refused(self):
        # Valid RE2 whose automaton has 90,003 states: matched state by state, one decision would take
        # seconds and hold half a gigabyte; it is refused at load, and a rule below the bound loads.
        with self.assertRaises(dip.ConfigError) as caught:
            policy_of({"blacklist": ["^" + "(?:.?){1000}" * 45 + "!"], "defaultAllow": True})
        self.assertIn("expression too large to match in bounded time (write fewer or smaller counted repetitions):"
                      f" `more than {dip.MAX_LINEAR_STATES} states`", str(caught.exception))
        policy = policy_of({"blacklist": ["(a*){1000}!"], "defaultAllow": True})
        self.assertIsInstance(policy.blacklist.rules[0].search.__self__, dip.LinearMatcher)
        self.assertTrue(policy.evaluate(parse_reference("a" * 200 + ":1")).allow)   # there is no "!" in a name
        matcher = policy.blacklist.rules[0].search.__self__
        for index in range(200):   # the memory of steps stays bounded whatever names come
            matcher.search(f"{'a' * index}b{'a' * (200 - index)}:1")
        self.assertLessEqual(matcher.stored, dip.MAX_CACHED_STATES + 200 * len(matcher.states))

    def test_what_re2_refuses_is_refused_with_go_words(self):
        for pattern, detail in [
            ("a{1001}", "invalid repeat count: `{1001}`"),
            ("((a{10}){10}){11}", "invalid repeat count: `{11}`"),
            ("a**", "invalid nested repetition operator: `**`"),
            ("a++", "invalid nested repetition operator: `++`"),
            ("*a", "missing argument to repetition operator: `*`"),
            ("[[:foo:]]", "invalid character class range: `[:foo:]`"),
            ("\\p{Foo}", "invalid character class range: `\\p{Foo}`"),
            ("\\C", "invalid escape sequence: `\\C`"),
            ("\\Z", "invalid escape sequence: `\\Z`"),
            ("\\x{110000}", "invalid escape sequence: `\\x{110000`"),
            ("[z-a]", "invalid character class range: `z-a`"),
            ("[a", "missing closing ]: `[a`"),
            ("(?x)a", "invalid or unsupported Perl syntax: `(?x`"),
            ("(?P<a-b>c)", "invalid named capture: `(?P<a-b>`"),
            ("a)", "unexpected ): `a)`"),
            ("(a", "missing closing ): `(a`"),
            ("a\\", "trailing backslash at end of expression: ``"),
            ("(" * 1001 + "a" + ")" * 1001, "expression nests too deeply"),
        ]:
            with self.subTest(pattern=pattern[:20]):
                message = self.refusal(pattern)
                self.assertIn(f'"blacklist"[0]: invalid regular expression {json.dumps(pattern)}: {detail}', message)
                if len(pattern) < 100:
                    self.assertIn("rules are RE2 syntax, as Go's regexp reads them", message)

    def test_python_look_arounds_and_back_references_keep_working(self):
        self.assertTrue(self.verdict("^nginx:(?!1\\.)", "nginx:latest"))
        self.assertFalse(self.verdict("^nginx:(?!1\\.)", "nginx:1.25"))
        self.assertTrue(self.verdict("(?<=/)miner:", "evil/miner:1"))
        self.assertTrue(self.verdict("^([a-z]+)/\\1:", "evil/evil:1"))
        self.assertTrue(dip.compile_rule("test.json", "blacklist", 0, "^nginx{,3}:").search("nginx{,3}:"))
        self.assertFalse(self.verdict("^([a-z]+)/\\1:", "evil/good:1"))
        # Inside and around them, RE2's reading holds.
        self.assertTrue(self.verdict("^[[:alpha:]]+:(?!1\\z)", "nginx:latest"))
        self.assertFalse(self.verdict("^[[:alpha:]]+:(?!1\\z)", "nginx:1"))
        # Python's syntax is not a way around RE2's limits.
        self.assertIn("invalid repeat count", self.refusal("(?=a{1001})"))
        self.assertIn("look-behind requires fixed-width pattern", self.refusal("(?<=a+)b"))

    def test_no_rule_can_stall_a_decision(self):
        # Rules Python's re would take seconds to hours on are matched in linear time, as RE2 matches them.
        crafted = ["a" * 250 + ":", "a/" * 120 + "a:latest", "a-" * 120 + "a:1", "a" * 254 + "!"]
        for pattern in TestPolicy.EXPONENTIAL + [".*/.*/.*/.*:latest$", ".*/.*/.*/.*/.*:latest$"]:
            if "(?!" in pattern:
                continue
            with self.subTest(pattern):
                rule = dip.compile_rule("test.json", "blacklist", 0, pattern)
                self.assertIsInstance(getattr(rule.search, "__self__", None), dip.LinearMatcher)
                for text in crafted:
                    started = time.perf_counter()
                    found = rule.search(text)
                    self.assertLess(time.perf_counter() - started, 0.25)
                    if len(text) < 30 or pattern.startswith(".*"):
                        self.assertEqual(found, bool(re.search(pattern, text)))
        # Ordinary rules stay with Python's re, at no cost on the request path.
        for pattern in ["^nginx:[^/]*$", ":latest$", "^quay\\.io/calico/(node|cni):v3\\.[0-9]+$", "^.*:latest$",
                        "^nginx:(?!latest$)[^/]+$", "^registry\\.example\\.com/team/[a-z0-9-]+:v[0-9]+$"]:
            with self.subTest(pattern):
                rule = dip.compile_rule("test.json", "whitelist", 0, pattern)
                self.assertIsInstance(rule.search.__self__, re.Pattern)
        # With Python's syntax nothing can match in linear time: such a rule is refused.
        message = self.refusal("^(?!(a+)+b)nginx:")
        self.assertIn("can take time polynomial of high degree or exponential in the length of a name", message)
        self.assertIn("cannot be matched in linear time", self.refusal(".*/.*(?<!x):latest$"))

    def test_rules_left_to_re_take_linear_time(self):
        # Generated rules that stay with Python's re, on names crafted to make re backtrack: no decision waits.
        rng = random.Random(21)
        texts = [(piece * 200)[:384] + end for piece in ("a", "a/", "a-", "a.", "0.", "ab", "aA", "a:", "k", "-", ":a")
                 for end in ("", "!", ":latest", "@")]
        left = 0
        for _ in range(600):
            pattern = TestGoRegexp.pattern(rng)
            with contextlib.suppress(dip.ConfigError):
                rule = dip.compile_rule("test.json", "blacklist", 0, pattern)
                if isinstance(rule.search.__self__, re.Pattern):
                    left += 1
                    for text in texts:
                        timings = []
                        for _ in range(3):
                            started = time.perf_counter()
                            rule.search(text)
                            timings.append(time.perf_counter() - started)
                        self.assertLess(min(timings), 0.001, (pattern, text))
        self.assertGreater(left, 200)

    def test_backtracking_degree(self):
        for pattern, degree in [("^nginx:[^/]*$", 1), (":latest$", 0), ("^.*:latest$", 1), (".*:latest$", 2),
                                ("^.*/.*:latest$", 2), (".*/.*/.*/.*:latest$", 5), ("^nginx:(?!latest$)[^/]+$", 1),
                                ("^(?:ab)*:", 1), ("^(?:ab)*a", 1), ("^(?:ab)*a.*", 2), ("^(a+)+$", math.inf),
                                ("^(a|a)*:", math.inf), ("^([a-z]+\\.)?example/", 1), ("^(a+){0,3}:", 4),
                                ("[a-z]+:latest", 2), ("^a?a?a?aaa", 3), ("^(?!.*:latest$).*$", 1),
                                ("^(?:(?!-rc)[^:])+:", 1), ("^(?:(?!.*-rc).)+:", 3), ("(?!.*-rc).*:", 2)]:
            with self.subTest(pattern):
                self.assertEqual(dip.backtracking_degree(dip.RE2Parser(pattern).parse()), degree)

    def test_linear_matcher_agrees_with_re(self):
        rng = random.Random(16)
        for _ in range(300):
            pattern = "".join(rng.choice(["a", "b", ".", "a*", "(?:ab|a)", "b?", "[ab]+", "$", "^", "\\b", "(a|b)*",
                                          "a{1,3}", "\\B", ":"]) for _ in range(rng.randint(1, 6)))
            tree = dip.RE2Parser(pattern).parse()
            matcher = dip.LinearMatcher(tree)
            for _ in range(20):
                text = "".join(rng.choice("ab:") for _ in range(rng.randint(0, 8)))
                with self.subTest(pattern=pattern, text=text):
                    self.assertEqual(matcher.search(text), bool(re.search(dip.python_pattern(tree), text, re.ASCII)))

    def test_linear_matcher_cache_is_bounded(self):
        # (a|b)*a(a|b){12}$ has thousands of DFA states: crafted names cannot make the cache grow without end.
        matcher = dip.LinearMatcher(dip.RE2Parser("(a|b)*a(a|b){12}$").parse())
        rng = random.Random(1)
        with mock.patch.object(dip, "MAX_CACHED_STEPS", 500):
            for _ in range(40):
                text = "".join(rng.choice("ab") for _ in range(200))
                self.assertEqual(matcher.search(text), text[-13] == "a")
                self.assertLessEqual(len(matcher.steps), 500 + len(text) + 1)
        self.assertTrue(matcher.search("x{,3}" + "a" * 13) and not matcher.search("b" * 13))


def python_syntax(pattern: str) -> bool:
    """Whether a pattern uses the Python syntax rules keep: look-arounds, back-references."""
    parser = dip.RE2Parser(pattern)
    parser.parse()
    return parser.extended


class TestGoRegexp(unittest.TestCase):
    """Every rule of a corpus decided by the plugin as Go's regexp.MatchString decides it, on many names."""

    count = 3000 * (10 if LONG else 1)

    def test_rules_match_what_go_matches(self):
        directory = tempfile.mkdtemp(prefix="dip-go-")
        self.addCleanup(shutil.rmtree, directory, ignore_errors=True)
        program = go_program(directory, GO_REGEXP, "the differential test against regexp")
        rng = random.Random(2026)
        references = self.references(rng)
        texts = sorted({form for reference in references for spelling in (reference, reference.alias) if spelling
                        for form in spelling.all_forms})
        patterns = RE2_CORPUS + [self.pattern(rng) for _ in range(self.count)]
        lines = json.dumps(texts) + "\n" + "".join(json.dumps(pattern) + "\n" for pattern in patterns)
        result = subprocess.run([program], input=lines, capture_output=True, text=True, timeout=600)
        self.assertEqual(result.returncode, 0, result.stderr)
        answers = [json.loads(line) for line in result.stdout.splitlines()]
        self.assertEqual(len(answers), len(patterns))
        index = {text: position for position, text in enumerate(texts)}
        disagreements, counts = [], {"refused by both": 0, "Python's syntax": 0, "decided": 0, "matches": 0}
        for pattern, answer in zip(patterns, answers):
            try:
                policy = policy_of({"blacklist": [pattern], "defaultAllow": True})
            except dip.ConfigError as error:
                if "error" not in answer:
                    disagreements.append(f"{pattern!r}: refused ({error}), Go accepts it")
                else:
                    counts["refused by both"] += 1
                continue
            if "error" in answer:
                if python_syntax(pattern) and re.search(
                        r"invalid (or unsupported Perl syntax: `\(\?[=!<]|escape sequence: `\\[1-9])", answer["error"]):
                    counts["Python's syntax"] += 1
                else:
                    disagreements.append(f"{pattern!r}: accepted, Go says {answer['error']}")
                continue
            rule = policy.blacklist.rules[0]
            for reference in references:
                forms = [form for spelling in (reference, reference.alias) if spelling
                         for form in dip._forms_seen(rule, spelling)]
                expected = any(answer["matches"][index[form]] for form in forms)
                decided = policy.evaluate(reference)
                counts["decided"] += 1
                counts["matches"] += expected
                if decided.allow == expected:
                    disagreements.append(f"{pattern!r} on {reference.familiar}: Go {'matches' if expected else 'does not'}"
                                         f" ({', '.join(forms)}), the plugin says {decided.reason}")
        summary = ", ".join(f"{name}: {number}" for name, number in counts.items())
        if disagreements:
            self.fail(f"{len(disagreements)} disagreements with Go ({summary}):\n" + "\n".join(disagreements[:30]))
        self.assertGreater(counts["refused by both"], 100, summary)
        self.assertEqual(counts["Python's syntax"], 3, summary)
        self.assertGreater(counts["matches"], counts["decided"] / 50, summary)
        self.assertLess(counts["matches"], counts["decided"] / 2, summary)

    @staticmethod
    def references(rng: random.Random) -> list[dip.Reference]:
        names = ["nginx:latest", "nginx:1.25", "Nginx:1", "redis:7", "kafka:3", "redis@" + DIGEST,
                 "quay.io/calico/node:v3.27.0", "localhost:5000/app:latest", "registry.example.com/team/app:v1",
                 "docker.io/library/nginx:latest", "evil/miner:1", "a:b", "k8s.gcr.io/pause:3.9",
                 "ghcr.io/owner/repo:sha-abc", "registry-1.docker.io/evil/x:1", "quay.io:443/evil/x:1"]
        words = ["nginx", "a", "k", "s", "x1", "lib", "a.b", "a-b", "a__b", "latest", "sha256"]
        for _ in range(150):
            path = "/".join(rng.choice(words) for _ in range(rng.randint(1, 3)))
            host = rng.choice(["", "", "quay.io/", "localhost:5000/", "Registry.Example.com/", "docker.io/", "h:80/"])
            tag = rng.choice(["", ":latest", ":1", ":V1.2-rc_K", ":Sk", ":" + "a" * rng.randint(1, 128)])
            names.append(host + path + tag + (("@" + DIGEST) if rng.random() < 0.1 else ""))
        names.append("a/" * 126 + "a:" + "a" * 128)
        references = []
        for name in names:
            with contextlib.suppress(InvalidReference):
                references.append(parse_reference(name))
        return references

    @staticmethod
    def pattern(rng: random.Random) -> str:
        def piece(depth: int) -> str:
            roll = rng.random()
            if roll < 0.55 or depth > 2:
                text = rng.choice(RE2_ATOMS)
            elif roll < 0.7:
                text = "(" + rng.choice(["", "?:", "?i:", "?P<n>", "?s:", "?-i:", "?U:"]) + sequence(depth + 1) + ")"
            elif roll < 0.8:
                text = "(?:" + sequence(depth + 1) + "|" + sequence(depth + 1) + ")"
            else:
                text = "[" + rng.choice(["", "^"]) + "".join(rng.choice(
                    ["a-z", "0-9", "k", "S", ".", "/", ":", "\\d", "\\pL", "[:upper:]", "[:^alpha:]", "-", "\\x{212A}",
                     "\\x{17F}", "A-Z", "\\w"]) for _ in range(rng.randint(1, 3))) + "]"
            if rng.random() < 0.35:
                text += rng.choice(["*", "+", "?", "{2}", "{1,3}", "{0,}", "*?", "+?", "{,2}", "{2,1}", "**"])
            return text
        def sequence(depth: int) -> str:
            return "".join(piece(depth) for _ in range(rng.randint(1, 4)))
        return rng.choice(["", "^", "(?i)", "^(?i)"]) + sequence(0) + rng.choice(["", "", "$", "\\z"])


# --------------------------------------------------------------------------
# Policy
# --------------------------------------------------------------------------

class TestPolicy(unittest.TestCase):
    def verdict(self, config: dict[str, Any], image: str) -> dip.Verdict:
        return policy_of(config).evaluate(parse_reference(image))

    def test_original_config_same_for_familiar_and_canonical(self):
        for familiar, canonical, allow in [
            ("nginx:1.25", "docker.io/library/nginx:1.25", True),
            ("docker:24-dind", "docker.io/library/docker:24-dind", True),
            ("quay.io/calico/node:v3", "quay.io/calico/node:v3", True),
            ("redis:7", "docker.io/library/redis:7", False),
            ("ubuntu:22.04", "docker.io/library/ubuntu:22.04", False),
        ]:
            with self.subTest(familiar):
                a, b = self.verdict(ORIGINAL_CONFIG, familiar), self.verdict(ORIGINAL_CONFIG, canonical)
                self.assertEqual((a.allow, a.rule), (allow, b.rule))
                self.assertEqual(b.allow, allow)

    def test_decision_order(self):
        config = {"whitelist": ["^nginx:1\\."], "blacklist": ["^nginx:"], "defaultAllow": True}
        self.assertEqual(self.verdict(config, "nginx:1.25").rule, 'whitelist[0] "^nginx:1\\\\."')
        verdict = self.verdict(config, "nginx:2")
        self.assertFalse(verdict.allow)
        self.assertEqual(verdict.reason, 'blacklist rule "^nginx:" matches')
        self.assertTrue(self.verdict(config, "redis").allow)
        verdict = self.verdict(dict(config, defaultAllow=False), "redis")
        self.assertEqual((verdict.allow, verdict.reason),
                         (False, "no whitelist rule matches and defaultAllow is false"))

    def test_registry_host_case_and_digests_as_written(self):
        config = {"whitelist": ["^localhost:5000/", "@sha256:[0-9a-f]{64}$"]}
        self.assertTrue(self.verdict(config, "LOCALHOST:5000/app:1").allow)
        self.assertTrue(self.verdict(config, f"redis:7@{DIGEST}").allow)
        self.assertFalse(self.verdict(config, "redis:7").allow)

    def test_registry_aliases_meet_blacklists_not_whitelists(self):
        config = {"whitelist": ["^nginx:", "^quay\\.io/calico/", "^vm/"], "blacklist": ["^evil/", "^quay\\.io/evil/"],
                  "defaultAllow": True}
        for image, allow in [("registry-1.docker.io/evil/miner:1", False), ("index.docker.io:443/evil/miner:1", False),
                             ("docker.io:443/evil/miner:1", False), ("quay.io:443/evil/x:1", False),
                             ("registry.hub.docker.com/evil/miner:1", False), ("someone/app:1", True)]:
            with self.subTest(image):
                self.assertEqual(self.verdict(config, image).allow, allow)
        verdict = self.verdict(config, "registry-1.docker.io/evil/miner:1")
        self.assertEqual(verdict.reason, 'blacklist rule "^evil/" matches evil/miner:1, the same repository under'
                                         ' its usual name')
        # A whitelist rule admits the spelling it names, not another host or port: vm:443 is not Docker Hub's vm/.
        strict = dict(config, defaultAllow=False)
        for image, allow in [("vm:443/evil:2", False), ("vm/app:1", True), ("registry-1.docker.io/library/nginx:1", False),
                             ("quay.io:443/calico/node:v3", False), ("quay.io/calico/node:v3", True)]:
            with self.subTest(image):
                self.assertEqual(self.verdict(strict, image).allow, allow)
        # DOCKER.IO/nginx is the repository "nginx" on the host DOCKER.IO, not the official nginx.
        self.assertFalse(self.verdict(dict(config, defaultAllow=False), "DOCKER.IO/nginx").allow)
        self.assertTrue(self.verdict(dict(config, defaultAllow=False), "DOCKER.IO/library/nginx:1").allow)

    def test_rules_that_name_docker_hub(self):
        # Rules are matched against familiar names, as the original plugin saw them,
        # and against canonical names too when they name docker.io.
        seed = {"whitelist": ["^docker"], "defaultAllow": False}
        for image, allow in [("docker:24", True), ("docker/compose:2", True), ("docker.io/docker/compose:2", True),
                             ("evil/miner:1", False), ("docker.io/evil/miner:1", False), ("dockerevil/x:1", True)]:
            with self.subTest(image):
                self.assertEqual(self.verdict(seed, image).allow, allow)
        hub = {"whitelist": ["^docker\\.io/"], "defaultAllow": False}
        for image, allow in [("evil/miner:1", True), ("nginx:1", True), ("quay.io/x/y:1", False)]:
            with self.subTest(image):
                self.assertEqual(self.verdict(hub, image).allow, allow)
        self.assertTrue(self.verdict({"whitelist": ["^(docker\\.io/)?library/"]}, "nginx:1").allow)
        self.assertFalse(self.verdict({"whitelist": ["library/"]}, "nginx:1").allow)
        self.assertTrue(self.verdict({"blacklist": ["^d"], "defaultAllow": True}, "evil/miner:1").allow)
        all_tags = policy_of(seed).evaluate_all_tags
        self.assertTrue(all_tags(parse_reference("docker/compose")).allow)
        self.assertFalse(all_tags(parse_reference("evil/miner")).allow)
        self.assertTrue(policy_of(hub).evaluate_all_tags(parse_reference("evil/miner")).allow)

    def test_digest_pins_under_the_original_rules(self):
        for config, image, allow in [
            ({"whitelist": ["^nginx:"]}, f"nginx@{DIGEST}", True),         # the original saw nginx:sha256:…
            ({"whitelist": ["^nginx:"]}, f"docker.io/library/nginx@{DIGEST}", True),
            ({"whitelist": ["^nginx:1\\."]}, f"nginx@{DIGEST}", False),   # a digest is no tag
            ({"whitelist": ["^nginx:"], "blacklist": [":latest$"], "defaultAllow": True}, f"redis@{DIGEST}", True),
            ({"blacklist": [":latest$"], "defaultAllow": True}, "redis", False),
            ({"whitelist": ["@sha256:"]}, f"redis@{DIGEST}", True),
            ({"whitelist": ["^redis:sha256:"]}, f"redis@{DIGEST}", True),
            ({"whitelist": ["^redis:sha256:"]}, f"redis:1@{DIGEST}", True),
            # dockerd fetches the digest and ignores the tag beside it: the tag admits nothing.
            ({"whitelist": ["^app:good"]}, f"app:good@{DIGEST}", False),
            ({"whitelist": ["^app:good"]}, "app:good", True),
            ({"whitelist": ["^nginx:1\\.25"]}, f"nginx:1.25@{DIGEST}", False),
        ]:
            with self.subTest(config=config, image=image):
                self.assertEqual(self.verdict(config, image).allow, allow)

    def test_moby_dangling_is_nameless(self):
        for config in [{"whitelist": ["^moby"]}, {"defaultAllow": True}, {"whitelist": [".*"]}]:
            for image in [f"moby-dangling@{DIGEST}", f"docker.io/library/moby-dangling@{DIGEST}"]:
                with self.subTest(config=config, image=image):
                    verdict = self.verdict(config, image)
                    self.assertEqual((verdict.allow, verdict.rule), (False, "nameless"))
        self.assertFalse(policy_of({"defaultAllow": True}).evaluate_all_tags(parse_reference("moby-dangling")).allow)
        self.assertTrue(self.verdict({"whitelist": ["^moby"]}, "moby-other:1").allow)

    def test_original_files_load_unchanged(self):
        # The original plugin matched its rules against fromImage:tag as the CLI sent them,
        # familiar names and digest pins as name:sha256:…, and pulls were all it checked.
        files = {"readme.json": ORIGINAL_README_CONFIG, "lists.json": json.dumps(ORIGINAL_CONFIG)}
        decisions = {"readme.json": [
            ("alpine", "3.19", 'whitelist[0] "^alpine:"'),
            ("docker.elastic.co/beats/filebeat", "8.12.0", 'whitelist[1] "^docker\\\\.elastic\\\\.co/beats/filebeat:"'),
            ("gcr.io/google_containers/pause", "3.1", 'whitelist[2] "^gcr\\\\.io/google_containers"'),
            ("nginx", "1.25", 'whitelist[4] "^nginx:"'),
            ("nginx", DIGEST, 'whitelist[4] "^nginx:"'),
            ("quay.io/calico/node", "v3.27.0", 'whitelist[8] "^quay\\\\.io/calico/node"'),
            ("docker", "24-dind", 'blacklist[0] "^docker:"'),
            ("docker", DIGEST, 'blacklist[0] "^docker:"'),
            ("docker/compose", "2", "defaultAllow"),
            ("redis", "7", "defaultAllow"),
        ], "lists.json": [
            ("docker", "24-dind", 'whitelist[1] "^docker:"'),
            ("docker", DIGEST, 'whitelist[1] "^docker:"'),
            ("nginx", DIGEST, 'whitelist[0] "^nginx:"'),
            ("quay.io/calico/node", "v3", 'whitelist[2] "^quay\\\\.io/calico/node"'),
            ("docker/compose", "2", "defaultAllow"),
            ("ubuntu", "22.04", 'blacklist[0] "^ubuntu:"'),
            ("ubuntu", DIGEST, 'blacklist[0] "^ubuntu:"'),
            ("redis", "7", "defaultAllow"),
        ]}
        directory = tempfile.mkdtemp(prefix="dip")
        self.addCleanup(shutil.rmtree, directory)
        for name, text in files.items():
            path = os.path.join(directory, name)
            Path(path).write_text(text)
            policy = dip.load_policy(path)
            self.assertEqual(policy.configuration(), {**dip.CONFIG_DEFAULTS, **json.loads(text), **{
                operation.key: False for operation in dip.OPERATIONS.values() if operation.opaque}})
            for repository, tag, rule in decisions[name]:
                # The CLI 20.10 sends the familiar name, the CLI 28 the canonical one.
                canonical = repository if "." in repository.split("/")[0] else \
                    "docker.io/" + ("library/" if "/" not in repository else "") + repository
                for from_image in (repository, quote(canonical, safe="")):
                    with self.subTest(file=name, image=from_image, tag=tag):
                        decision = dip.decide(policy, pull(f"/v1.41/images/create?fromImage={from_image}&tag={tag}"),
                                              NO_DOCKER)
                        self.assertEqual((decision.allow, decision.rule), (rule.startswith("whitelist"), rule))
        policy = policy_of(ORIGINAL_CONFIG)
        self.assertEqual((policy.mode, policy.check_run, policy.message), ("enforce", True, ""))
        self.assertFalse(policy.allows_operation(dip.LOAD).allow)
        self.assertTrue(policy_of(dict(ORIGINAL_CONFIG, defaultAllow=True)).allows_operation(dip.BUILD).allow)
        self.assertFalse(policy_of({"defaultAllow": True, "allowBuild": False}).allows_operation(dip.BUILD).allow)

    def config_error(self, text: str) -> str:
        with self.assertRaises(dip.ConfigError) as caught:
            dip.compile_policy(text, "/etc/docker/p.json")
        return str(caught.exception)

    def test_config_errors_name_file_key_pattern_and_position(self):
        self.assertEqual(self.config_error('{"whitelist": ["^ok", "^ngi(nx"]}'),
                         '/etc/docker/p.json: "whitelist"[1]: invalid regular expression "^ngi(nx":'
                         " missing closing ): `^ngi(nx` (rules are RE2 syntax, as Go's regexp reads them)")
        self.assertEqual(self.config_error('{"whitelst": [], "defaultallow": true, "colour": 1}'),
                         '/etc/docker/p.json: unknown key "whitelst" (did you mean "whitelist"?); unknown key'
                         ' "colour" (known keys: whitelist, blacklist, scopes, defaultAllow, mode, checkRun,'
                         ' allowBuild, allowCommit, allowImport, allowLoad, allowPluginCreate, allowSwarm, message,'
                         ' tests)')
        self.assertEqual(self.config_error('{"whitelist": ["^a", "^b", "^c", 5]}'),
                         '/etc/docker/p.json: "whitelist"[3]: must be a string, not 5')
        self.assertEqual(self.config_error(' \n'), "/etc/docker/p.json: the file is empty (an empty policy is {})")
        self.assertEqual(self.config_error("[" * 100000), "/etc/docker/p.json: invalid JSON: maximum recursion depth"
                                                           " exceeded while decoding a JSON array from a unicode string")
        self.assertEqual(self.config_error('{"defaultAllow": "yes"}'),
                         '/etc/docker/p.json: "defaultAllow": must be true or false, not "yes"')
        self.assertEqual(self.config_error('{"blacklist": "^a"}'),
                         '/etc/docker/p.json: "blacklist": must be a list of strings, not "^a"')
        self.assertEqual(self.config_error('{"mode": "warn"}'),
                         '/etc/docker/p.json: "mode": must be "enforce" or "audit", not "warn"')
        self.assertEqual(self.config_error('{\n  "whitelist": [\n  "a",\n}'),
                         "/etc/docker/p.json: line 4 column 1: invalid JSON: Expecting value")
        self.assertEqual(self.config_error('{"colour": 1, "whitelist": ["^ok", "("], "mode": "warn"}'),
                         '/etc/docker/p.json: unknown key "colour" (known keys: whitelist, blacklist, scopes, defaultAllow,'
                         ' mode, checkRun, allowBuild, allowCommit, allowImport, allowLoad, allowPluginCreate,'
                         ' allowSwarm, message, tests); "mode": must be "enforce" or "audit", not "warn";'
                         ' "whitelist"[1]: invalid regular expression "(": missing closing ): `(` (rules are RE2'
                         " syntax, as Go's regexp reads them)")
        self.assertEqual(self.config_error('{"whitelist": ["^a", "^b"], "whitelist": ["^c"], "whitelist": [null, null]}'),
                         '/etc/docker/p.json: "whitelist": an array that repeats shorter then longer is ambiguous:'
                         ' what Go reads depends on the Go version')

    def test_the_file_is_read_as_the_go_plugin_read_it(self):
        # Keys fold as encoding/json folds them, ſ and the Kelvin sign included.
        policy = policy_of_text('{"Whitelist": ["^a:"], "DEFAULTALLOW": true, "blackli\u017ft": ["^b"],'
                                ' "chec\u212aRun": false}')
        self.assertEqual(([r.pattern for r in policy.whitelist.rules], [r.pattern for r in policy.blacklist.rules],
                          policy.default_allow, policy.check_run), (["^a:"], ["^b"], True, False))
        self.assertEqual(policy.keys, {"whitelist", "blacklist", "defaultAllow", "checkRun"})
        # null: no list, and every other setting keeps its default.
        policy = policy_of_text('{"whitelist": null, "blacklist": null, "defaultAllow": null, "checkRun": null,'
                                ' "mode": null, "allowBuild": null, "message": null, "tests": null}')
        self.assertEqual((policy.whitelist.rules, policy.blacklist.rules, policy.default_allow, policy.check_run,
                          policy.mode, policy.message, policy.tests), ((), (), False, True, "enforce", "", ()))
        self.assertEqual(policy.operations[dip.BUILD].reason.split(";")[0], "'allowBuild' is not set and defaultAllow"
                                                                          " is false")
        # A null in a list is Go's empty string, a rule that matches every name.
        self.assertEqual([r.pattern for r in policy_of_text('{"blacklist": [null, "^x"]}').blacklist.rules], ["", "^x"])
        # A later duplicate is decoded over the earlier one; text after the object is not read. Both are noted.
        policy = policy_of_text('{\n"mode": "audit",\n"whitelist": [],\n"MODE": "enforce"}\n{"defaultAllow": true}')
        self.assertEqual((policy.mode, policy.default_allow), ("enforce", False))
        self.assertEqual(policy.notes, ('"mode" is given 2 times: as Go\'s decoder does, each is decoded over the one'
                                        ' before, so the last decides',
                                        "the text after the configuration object (from line 4) is ignored, as the Go"
                                        " plugin's decoder ignored it"))
        self.assertEqual(policy_of(ORIGINAL_CONFIG).notes, ())
        # Invalid UTF-8 is read as Go reads it, one U+FFFD per byte.
        with tempfile.NamedTemporaryFile("wb", suffix=".json") as file:
            file.write(b'{"message": "caf\xe9 \xff"}')
            file.flush()
            self.assertEqual(dip.load_policy(file.name).message, "caf\ufffd \ufffd")
        self.assertEqual(self.config_error('[]'), "/etc/docker/p.json: the configuration must be a JSON object")

    def test_all_tags_pull_needs_a_prefix_rule_covering_every_tag(self):
        nginx = parse_reference("nginx")
        self.assertTrue(policy_of({"whitelist": ["^nginx:"]}).evaluate_all_tags(nginx).allow)
        self.assertTrue(policy_of({"whitelist": ["^docker\\.io/library/"]}).evaluate_all_tags(nginx).allow)
        self.assertFalse(policy_of({"whitelist": ["^nginx:1\\."]}).evaluate_all_tags(nginx).allow)
        self.assertFalse(policy_of({"whitelist": ["^nginx:(1|2)"]}).evaluate_all_tags(nginx).allow)
        self.assertTrue(policy_of({"defaultAllow": True}).evaluate_all_tags(nginx).allow)
        verdict = policy_of({"defaultAllow": True, "blacklist": [":latest$"]}).evaluate_all_tags(nginx)
        self.assertFalse(verdict.allow)
        self.assertIn("pull a tag or digest", verdict.reason)

    def test_literal_prefixes(self):
        for pattern, expected in [
            ("^quay\\.io/calico/node", ("quay.io/calico/node", True)),
            ("^nginx:1\\.", ("nginx:1.", True)),
            ("\\Alocalhost:5000/", ("localhost:5000/", True)),
            ("^nginx:.*", ("nginx:", False)),
            ("^ab*", ("a", False)),
            ("^a|^b", ("", False)),
            ("nginx", (None, False)),
            ("(?i)^nginx", (None, False)),
            ("^(?:nginx)", ("nginx", True)),
            ("^(nginx)", ("", False)),
        ]:
            with self.subTest(pattern):
                self.assertEqual(dip.literal_prefix(re.compile(pattern)), expected)

    def test_the_first_matching_rule_in_file_order_decides(self):
        # The index finds anchored and unanchored rules apart: the verdict still names the first in the
        # file, which the log, --replay and --validate report.
        for rules, image, index in [(["^nginx:", "nginx"], "nginx:1", 0), (["nginx", "^nginx:"], "nginx:1", 0),
                                    (["^nginx:1", "^nginx:", "1$"], "nginx:1", 0), ([":1$", "^nginx:"], "nginx:1", 0),
                                    (["^redis:", "q", "^nginx:", "nginx"], "nginx:1", 2),
                                    (["^nginx", "^nginx:"], "nginx:1", 0), (["^nginx:", "^nginx"], "nginx:1", 0)]:
            for kind in ("whitelist", "blacklist"):
                with self.subTest(rules=rules, kind=kind):
                    verdict = policy_of({kind: rules, "defaultAllow": kind == "blacklist"}).evaluate(
                        parse_reference(image))
                    self.assertEqual((verdict.allow, verdict.rule),
                                     (kind == "whitelist", f"{kind}[{index}] {json.dumps(rules[index])}"))

    def test_indexed_lookup_equals_rule_by_rule_evaluation(self):
        rng = random.Random(6)
        hosts = ["docker.io", "quay.io", "localhost:5000", "registry.example.com", "ghcr.io"]
        words = ["nginx", "library", "calico", "node", "app", "team", "x", "redis", "a.b", "c-d"]
        def reference() -> str:
            path = "/".join(rng.choice(words).replace(".", "") for _ in range(rng.randint(1, 3)))
            text = (rng.choice(hosts) + "/" if rng.random() < 0.6 else "") + path
            if rng.random() < 0.8:
                text += ":" + rng.choice(["1", "1.25", "latest", "v3", "2-alpine"])
            if rng.random() < 0.2:
                text += "@" + DIGEST
            return text
        def pattern() -> str:
            literal = re.escape(reference()[: rng.randint(1, 20)])
            return rng.choice([
                f"^{literal}", f"^{literal}.*", f"{literal}", f"^{literal}$", f"(?i)^{literal.upper()}",
                f"^{literal}|^{re.escape(reference()[:5])}", f"^{literal}[0-9]+", f":{rng.choice(['latest', '1'])}$",
                f"^[a-z]+{literal}", f"^{literal}(?:/|:)", "@sha256:", f"^(?:{literal})",
            ])
        references = []
        for _ in range(3000):
            with contextlib.suppress(InvalidReference):
                references.append(parse_reference(reference()))
        for trial in range(20 if LONG else 3):
            config = {"whitelist": [pattern() for _ in range(rng.randint(0, 200))],
                      "blacklist": [pattern() for _ in range(rng.randint(0, 200))],
                      "defaultAllow": rng.random() < 0.5}
            policy = policy_of(config)
            for ref in references:
                expected = None
                for kind in ("whitelist", "blacklist"):
                    for index, text in enumerate(config[kind]):
                        # Rules that name docker.io see canonical forms too (test_rules_that_name_docker_hub), and
                        # so do blacklist rules that do not refuse every Docker Hub image by them alone.
                        canonical = re.search(r"docker\W*io", text, re.I) or kind == "blacklist" and not all(
                            re.search(text, probe) for probe in ("docker.io/library/zz0:1", "docker.io/zz0/zz0:1"))
                        forms = ref.forms(False) + (ref.forms(True) if canonical else ())
                        if expected is None and any(re.search(text, form) for form in forms):
                            expected = (kind == "whitelist", f"{kind}[{index}] {json.dumps(text)}")
                expected = expected or (config["defaultAllow"], "defaultAllow")
                verdict = policy.evaluate(ref)
                self.assertEqual((verdict.allow, verdict.rule), expected, (trial, ref.canonical))

    def test_indexed_lookup_under_the_services_interpreter(self):
        # The systemd unit runs /usr/bin/python3, whose re._parser gives the prefixes the index trusts.
        system = "/usr/bin/python3"
        if not os.path.exists(system):
            self.skipTest(f"{system} is missing")
        version = subprocess.run([system, "-c", "import sys; print(*sys.version_info[:2])"], capture_output=True,
                                 text=True, check=True).stdout.split()
        if version == [str(part) for part in sys.version_info[:2]]:   # re._parser changes only between feature releases
            self.skipTest(f"{system} is Python {'.'.join(version)}, as the interpreter running these tests is")
        test = f"{Path(__file__).stem}.TestPolicy.test_indexed_lookup_equals_rule_by_rule_evaluation"
        result = subprocess.run([system, "-m", "unittest", test], cwd=HERE, capture_output=True, text=True, timeout=300)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertRegex(result.stderr, r"\nRan 1 test in .*\n\nOK\n$")

    def test_prefix_index_fails_closed(self):
        # A prefix is trusted only where the pattern agrees with it on probe strings.
        for pattern, prefix, trusted in [
            ("^evil/", "evil/", ("evil/", True)),
            ("^quay\\.io/evil/", "quay.io/", ("quay.io/", False)),   # a true prefix, but not the whole pattern
            ("^nginx:1", "nginx:", ("nginx:", False)),
            ("^evil/", "good/", (None, False)),                       # the pattern matches what does not start with it
            ("^evil/", "evil/miner", (None, False)),                  # longer than the pattern's literal text
            ("^ab*", "ab", (None, False)),                            # a repeated letter read as a literal
            ("^a\\d", "ad", (None, False)),                           # an escape read as a letter
            ("^quay\\.io/evil/", "quayXio/evil/", (None, False)),
        ]:
            with self.subTest(pattern=pattern, prefix=prefix):
                self.assertEqual(dip.trusted_prefix(re.compile(pattern), prefix, True), trusted)
        # Were the parser ever to give a wrong prefix, the blacklist rule would still be tried where it matches.
        for pattern, wrong, image in [("^evil/", "good/", "evil/miner:1"),
                                      ("^evil/", "evil/miner/", "registry-1.docker.io/evil/miner:1"),
                                      ("^redis:6", "redis:6.", "redis:6"), ("^a\\d", "ad", "a1:1")]:
            with self.subTest(pattern=pattern, wrong=wrong):
                with mock.patch.object(dip, "_parsed_prefix", return_value=(wrong, True)):
                    policy = policy_of({"blacklist": [pattern], "defaultAllow": True})
                self.assertIsNone(policy.blacklist.rules[0].prefix)   # tried on every request
                verdict = policy.evaluate(parse_reference(image))
                self.assertEqual((verdict.allow, verdict.rule), (False, f"blacklist[0] {json.dumps(pattern)}"))

    def test_warnings(self):
        policy = policy_of({"whitelist": ["^quay\\.io/", "nginx", "^library/nginx:", "^index\\.docker\\.io/", "x*",
                                          "^Docker\\.io/", "^docker"],
                            "blacklist": ["^quay\\.io/evil", "^docker\\.io/library/ubuntu", ":latest$", ".*"],
                            "defaultAllow": True})
        never = ("no image reference can match it (rules see familiar names such as nginx:1.25, and canonical ones"
                 " such as docker.io/library/nginx:1.25 only when they name docker.io; index.docker.io is spelled"
                 " docker.io)")
        self.assertEqual(dip.policy_warnings(policy), [
            'whitelist[1] "nginx": not anchored with ^ (or $), so it matches anywhere in an image name',
            f'whitelist[2] "^library/nginx:": {never}',
            f'whitelist[3] "^index\\\\.docker\\\\.io/": {never}',
            'whitelist[4] "x*": matches every image, so the whitelist allows everything',
            f'whitelist[5] "^Docker\\\\.io/": {never}',
            'whitelist[6] "^docker": matched against familiar names (nginx:1.25) as the original plugin did, so it'
            ' does not allow every Docker Hub image; a rule that names docker.io, such as ^docker\\.io/, is'
            ' matched against canonical names too',
            'blacklist[0] "^quay\\\\.io/evil" is unreachable: whitelist[0] "^quay\\\\.io/" allows everything it'
            ' matches first',
        ])
        self.assertEqual(dip.policy_warnings(policy_of(ORIGINAL_CONFIG)), [
            'whitelist[0] "^nginx:": allows nginx:5000/evil/miner, an image from the registry nginx:5000, not a tag'
            ' of nginx; end the rule at the tag, e.g. ^nginx:[^/]*$ (a tag has no /)',
            'whitelist[1] "^docker:": allows docker:5000/evil/miner, an image from the registry docker:5000, not a'
            ' tag of docker; end the rule at the tag, e.g. ^docker:[^/]*$ (a tag has no /)',
            'whitelist[2] "^quay\\\\.io/calico/node": allows quay.io/calico/nodeevil/miner, another name that begins'
            ' with quay.io/calico/node; end the name, e.g. ^quay\\.io/calico/node[:@] for its tags and digests, or'
            ' ^quay\\.io/calico/node/ for the repositories under it',
            'blacklist[0] "^ubuntu:" can never change a decision: defaultAllow is false, so what no whitelist rule'
            ' allows is denied anyway (ubuntu:latest is denied with or without it); remove it',
        ])

    def assert_warns(self, config: dict[str, Any], expected: list[str],
                     decided: dict[str, tuple[bool, str]] | None = None) -> None:
        """The warnings, and that each image they name is decided as they say."""
        policy = policy_of(config)
        self.assertEqual(dip.policy_warnings(policy), expected)
        for image, (allow, rule) in (decided or {}).items():
            verdict = policy.evaluate(parse_reference(image))
            self.assertEqual((verdict.allow, verdict.rule), (allow, rule), image)

    def test_warnings_name_an_image_a_whitelist_rule_wrongly_allows(self):
        self.assert_warns({"whitelist": ["^nginx"]}, [
            'whitelist[0] "^nginx": allows nginxevil/miner, another name that begins with nginx; end the name, e.g.'
            ' ^nginx:[^/]*$ for its tags and digests, or ^nginx/ for the repositories under it',
        ], {"nginxevil/miner": (True, 'whitelist[0] "^nginx"')})
        self.assert_warns({"whitelist": ["^registry.example.com/"]}, [
            'whitelist[0] "^registry.example.com/": allows registry-example.com/evil/miner: an unescaped . matches'
            ' any character; escape the dots: ^registry\\.example\\.com/',
        ], {"registry-example.com/evil/miner": (True, 'whitelist[0] "^registry.example.com/"')})
        self.assert_warns({"whitelist": ["^quay.io/calico/node:v3.", "^registry\\.example\\.com"]}, [
            'whitelist[0] "^quay.io/calico/node:v3.": allows quay-io/calico/node:v3.: an unescaped . matches any'
            ' character; escape the dots: ^quay\\.io/calico/node:v3\\.',
            'whitelist[1] "^registry\\\\.example\\\\.com": allows registry.example.comevil/miner, another name that'
            ' begins with registry.example.com; end the name, e.g. ^registry\\.example\\.com/ for the repositories'
            ' on that registry',
        ], {"quay-io/calico/node:v3.": (True, 'whitelist[0] "^quay.io/calico/node:v3."'),
            "registry.example.comevil/miner": (True, 'whitelist[1] "^registry\\\\.example\\\\.com"')})
        self.assert_warns({"whitelist": ["^nginx:", "^localhost:5000", "^postgres:16"]}, [
            'whitelist[0] "^nginx:": allows nginx:5000/evil/miner, an image from the registry nginx:5000, not a tag'
            ' of nginx; end the rule at the tag, e.g. ^nginx:[^/]*$ (a tag has no /)',
            'whitelist[1] "^localhost:5000": allows localhost:50000/evil/miner, another name that begins with'
            ' localhost:5000; end the name, e.g. ^localhost:5000/ for the repositories on that registry',
            'whitelist[2] "^postgres:16": allows postgres:160/evil/miner, an image from the registry postgres:160,'
            ' not a tag of postgres; end the rule at the tag, e.g. ^postgres:16[^/]*$ (a tag has no /)',
        ], {"nginx:5000/evil/miner": (True, 'whitelist[0] "^nginx:"'),
            "localhost:50000/evil/miner": (True, 'whitelist[1] "^localhost:5000"'),
            "postgres:160/evil/miner": (True, 'whitelist[2] "^postgres:16"')})
        # A name another whitelist rule allows first is that rule's, not this one's.
        self.assert_warns({"whitelist": ["^nginx[:/@]", "^nginx"], "defaultAllow": True}, [
            'whitelist[0] "^nginx[:/@]": allows nginx:5000/evil/miner, an image from the registry nginx:5000, not a'
            ' tag of nginx; end the rule at the tag, e.g. ^nginx:[^/]*$ (a tag has no /)',
            'whitelist[1] "^nginx": allows nginxevil/miner, another name that begins with nginx; end the name, e.g.'
            ' ^nginx:[^/]*$ for its tags and digests, or ^nginx/ for the repositories under it',
        ])

    def test_warnings_for_rules_that_never_match(self):
        self.assert_warns({"whitelist": ["^nginx$", "^quay\\.io/calico/node\\z", "^Nginx$", "^nginx:1\\.25$",
                                         f"^nginx:{DIGEST}$", "^docker\\.io/library/nginx:latest$"]}, [
            'whitelist[0] "^nginx$": never matches: every image reference has a tag or digest, and nginx is matched'
            ' as nginx:latest; use ^nginx:latest$ for that tag, or ^nginx:[^/]*$ for its tags and digests, or'
            ' ^nginx/ for the repositories under it',
            'whitelist[1] "^quay\\\\.io/calico/node\\\\z": never matches: every image reference has a tag or digest,'
            ' and quay.io/calico/node is matched as quay.io/calico/node:latest; use ^quay\\.io/calico/node:latest$'
            ' for that tag, or ^quay\\.io/calico/node[:@] for its tags and digests, or ^quay\\.io/calico/node/ for'
            ' the repositories under it',
            'whitelist[2] "^Nginx$": never matches: no image reference is spelled Nginx',
        ])
        self.assertTrue(self.verdict({"whitelist": [f"^nginx:{DIGEST}$"]}, f"nginx@{DIGEST}").allow)
        self.assertEqual(dip.policy_warnings(policy_of({"whitelist": ["^nginx:sha256:", "^nginx:sha512:ab"]})), [])

    def test_no_false_warnings(self):
        # Anchored after inline flags, and ending at a boundary: only the registry-port warning applies.
        for pattern in ["^nginx:", "(?i)^nginx:"]:
            with self.subTest(pattern):
                self.assertEqual([warning.split(": ", 1)[1] for warning in dip.policy_warnings(
                    policy_of({"whitelist": [pattern]}))], [
                    "allows nginx:5000/evil/miner, an image from the registry nginx:5000, not a tag of nginx; end the"
                    f" rule at the tag, e.g. {pattern}[^/]*$ (a tag has no /)"])
        for pattern in ["^nginx:[^/]*$", "(?i)^nginx:[^/]*$", "(?i)^NGINX:[^/]+$", "^nginx:1\\.", "^nginx:1\\.25$",
                        "^quay\\.io/calico/node:v3\\.", "^quay\\.io/calico/node[:@]", "^quay\\.io/calico/",
                        "^registry\\.example\\.com/", "^registry\\.example\\.com:5000/", "^localhost:5000/",
                        "^registry\\.example\\.com/team/[a-z0-9-]+:v[0-9]+$", "^docker\\.io/",
                        "^registry\\.example\\.com/.*@sha256:[0-9a-f]{64}$", "^[a-z0-9]+(?:[._-][a-z0-9]+)*:1\\.",
                        "^nginx:(?!latest$)[^/]+$", "^quay\\.io/calico/node:(?!latest$)", "^(?:nginx|redis):[^/]*$"]:
            with self.subTest(pattern):
                self.assertEqual(dip.policy_warnings(policy_of({"whitelist": [pattern]})), [])
                self.assertEqual(dip.policy_warnings(policy_of({"blacklist": [pattern], "defaultAllow": True})), [])

    def test_rules_that_match_no_image_and_alternatives_that_match_too_much(self):
        for pattern in ["^[a-z]*$", "^(\\w+\\s?)*$", "^(?:[a-z]+)*$"]:
            with self.subTest(pattern):
                policy = policy_of({"whitelist": [pattern]})
                self.assertFalse(policy.evaluate(parse_reference("nginx:1")).allow)
                self.assertEqual(dip.policy_warnings(policy), [
                    f"whitelist[0] {json.dumps(pattern)}: matches the empty text but no image name: every reference"
                    " has a tag or digest (nginx:1), which it does not allow for"])
        self.assertEqual(dip.policy_warnings(policy_of({"whitelist": [".*"]})),
                         ['whitelist[0] ".*": matches every image, so the whitelist allows everything'])
        policy = policy_of({"whitelist": ["^(nginx|redis)"]})
        self.assertTrue(policy.evaluate(parse_reference("nginxevil/miner:1")).allow)
        self.assertEqual(dip.policy_warnings(policy), [
            f'whitelist[0] "^(nginx|redis)": allows {name}evil/miner, another name that begins with {name}; end the'
            f" name, e.g. ^{name}:[^/]*$ for its tags and digests, or ^{name}/ for the repositories under it"
            for name in ("nginx", "redis")])

    def test_blacklist_rules_that_never_change_a_decision(self):
        self.assert_warns({"whitelist": ["^nginx:[^/]*$", "^quay\\.io/calico/"],
                           "blacklist": [":latest$", "^ubuntu:", "^quay\\.io/calico/", ".*"]}, [
            'blacklist[0] ":latest$" can never change a decision: defaultAllow is false, so what no whitelist rule'
            ' allows is denied anyway, and what one allows is allowed whatever the blacklist says: nginx:latest is'
            ' allowed by whitelist[0] "^nginx:[^/]*$"; narrow that rule so that it does not allow nginx:latest, e.g.'
            ' with a lookahead (?!…), and remove this one',
            'blacklist[1] "^ubuntu:" can never change a decision: defaultAllow is false, so what no whitelist rule'
            ' allows is denied anyway (ubuntu:latest is denied with or without it); remove it',
            'blacklist[2] "^quay\\\\.io/calico/" is unreachable: whitelist[1] "^quay\\\\.io/calico/" allows everything'
            ' it matches first',
            'blacklist[3] ".*" can never change a decision: defaultAllow is false, so what no whitelist rule allows'
            ' is denied anyway (evil/miner:1 is denied with or without it); remove it',
        ], {"nginx:latest": (True, 'whitelist[0] "^nginx:[^/]*$"'), "ubuntu:latest": (False, 'blacklist[0] ":latest$"'),
            "evil/miner:1": (False, 'blacklist[3] ".*"')})
        # The lookahead that excludes the tag, when the whitelist rule is a plain prefix ending at the tag.
        self.assertEqual(dip.policy_warnings(policy_of({"whitelist": ["^quay\\.io/calico/node:"],
                                                        "blacklist": [":latest$"]})), [
            'blacklist[0] ":latest$" can never change a decision: defaultAllow is false, so what no whitelist rule'
            ' allows is denied anyway, and what one allows is allowed whatever the blacklist says:'
            ' quay.io/calico/node:latest is allowed by whitelist[0] "^quay\\\\.io/calico/node:"; narrow that rule so'
            ' that it does not allow quay.io/calico/node:latest, e.g. with ^quay\\.io/calico/node:(?!latest$), and'
            ' remove this one'])
        self.assertEqual(dip.policy_warnings(policy_of({"whitelist": ["^nginx:[^/]*$"], "blacklist": [":latest$"],
                                                        "defaultAllow": True})), [])

    # Ordinary rules, and rules with repetitions that can split one text in many ways.
    LINEAR = ["^registry\\.example\\.com/team/[a-z0-9-]+:v[0-9]+$", "^registry\\.example\\.com/.*@sha256:[0-9a-f]{64}$",
              "^(?:[a-z0-9]+/)*[a-z0-9]+:", "^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*:1",
              "^([a-z0-9]+\\.)+example\\.com/", "^(?:[a-z0-9]+(?:-[a-z0-9]+)*\\.)+[a-z]{2,}/",
              "^quay\\.io/calico/(node|cni|kube-controllers):v3\\.[0-9]+$",
              "(?i)^nginx:", "^nginx:(?!latest$)[^/]+$", ":latest$", "^(?:nginx|node)*:", "^(a|ab)*:", "^(-+[a-z]+)*:",
              "^(?:[a-z0-9]{1,63}\\.)*[a-z]+/", "^(a+){0,3}:", ".*", "^nginx:1\\.2[0-9](?:\\.[0-9]+)?(?:-alpine)?$"]
    EXPONENTIAL = ["^([a-z0-9]+[._-]?)*:1\\.", "^(a+)+$", "^(\\w+)*:", "^([a-z]+/?)+:", "^(\\d+\\.?)+:", "^(a|aa)+:",
                   "^((a|a)/)*:", "^(?:[a-z]+|[0-9]+)*:", "^(a+){0,10}:", "^[a-z0-9]+(?:(?:[._]|__|[-]*)[a-z0-9]+)*:1",
                   "^(x+x+)+y", "^(a|a?)+:", "^(?!(a+)+b)nginx:", "^([a-z]*-[a-z]*)*:", "^([a-z]+/[0-9a-z]+)*:",
                   "(?i)^([A-Z]+[a-z]?)*:", "^(.*)*:", "^(?:[^/]+/?)*:$"]

    def test_nested_repetition(self):
        # Rules with nested repetition load as RE2 reads them and cannot stall: --validate has nothing to say.
        for pattern in self.LINEAR + self.EXPONENTIAL:
            if "(?!(" in pattern:
                continue
            with self.subTest(pattern):
                tree = dip.RE2Parser(pattern).parse()
                degree = dip.backtracking_degree(tree)
                if pattern in self.EXPONENTIAL:
                    self.assertEqual(degree, math.inf)
                rule = dip.compile_rule("test.json", "whitelist", 0, pattern)
                linear = isinstance(getattr(rule.search, "__self__", None), dip.LinearMatcher)
                self.assertEqual(linear, degree > dip.MAX_BACKTRACKING_DEGREE)
        policy = policy_of({"whitelist": ["^nginx:[^/]*$", "^([a-z0-9]+[._-]?)*:1\\."], "blacklist": ["^(\\w+)*:"],
                            "defaultAllow": True})
        self.assertEqual(dip.policy_warnings(policy), [])
        started = time.perf_counter()
        self.assertTrue(policy.evaluate(parse_reference("a" * 60 + ":1.0")).allow)
        self.assertFalse(policy.evaluate(parse_reference("a" * 230 + "b:2")).allow)
        self.assertLess(time.perf_counter() - started, 0.1)

    def test_policy_tests_are_read_at_load(self):
        policy = policy_of({"whitelist": ["^nginx:"], "tests": [
            {"image": "nginx:1.25", "expect": "allow"},
            {"image": "nginx", "operation": "pull (all tags)", "expect": "allow", "note": "every tag"},
            {"image": "nginx:1", "operation": "tag", "target": "redis:7", "expect": "deny"},
            {"operation": "load", "expect": "deny"}]})
        self.assertEqual([(test.index, test.operation.command, test.allow) for test in policy.tests],
                         [(0, "pull", True), (1, "pull-all-tags", True), (2, "tag", False), (3, "load", False)])
        self.assertEqual(policy.configuration()["tests"], [
            {"image": "nginx:1.25", "expect": "allow"},
            {"image": "nginx", "operation": "pull-all-tags", "expect": "allow", "note": "every tag"},
            {"image": "nginx:1", "operation": "tag", "target": "redis:7", "expect": "deny"},
            {"operation": "load", "expect": "deny"}])
        self.assertEqual(policy_of(ORIGINAL_CONFIG).tests, ())
        operations = ", ".join(dip.COMMANDS)
        for tests, error in [
            ({"image": "x"}, '"tests": must be a list of objects, not {"image": "x"}'),
            ([["nginx"]], '"tests"[0]: must be an object such as {"image": "nginx:1.25", "expect": "allow"},'
                          ' not ["nginx"]'),
            ([{"image": "nginx", "expect": "allow", "expected": "deny"}],
             '"tests"[0]: unknown key "expected" (did you mean "expect"?) (known keys: image, operation, target,'
             ' caller, at, signed, expect, note)'),
            ([{"image": "nginx", "expect": "allow"}, {"image": "nginx", "expect": "yes"}],
             '"tests"[1]: "expect" must be "allow" or "deny", not "yes"'),
            ([{"image": "nginx"}], '"tests"[0]: "expect" must be "allow" or "deny", and is missing'),
            ([{"image": 7, "expect": "deny"}], '"tests"[0]."image": must be a string, not 7'),
            ([{"image": "nginx", "operation": "push", "expect": "deny"}],
             f'"tests"[0]: "operation" must be one of {operations}, not "push"'),
            ([{"operation": "run", "expect": "deny"}], '"tests"[0]: "image" is missing: a run names an image'),
            ([{"image": "x", "operation": "build", "expect": "deny"}],
             '"tests"[0]: a build names no image: remove "image"'),
            ([{"image": "nginx:1", "operation": "tag", "expect": "deny"}],
             '"tests"[0]: "target", the new name, is needed for a tag and only for a tag'),
            ([{"image": "nginx:1", "target": "nginx:2", "expect": "deny"}],
             '"tests"[0]: "target", the new name, is needed for a tag and only for a tag'),
        ]:
            with self.subTest(tests=tests):
                self.assertEqual(self.config_error(json.dumps({"tests": tests})), f"/etc/docker/p.json: {error}")

    def test_policy_tests_judge_as_requests_are_judged(self):
        policy = policy_of({"whitelist": ["^nginx:", "^localhost:5000/ok/"], "blacklist": [":latest$"],
                            "defaultAllow": True, "mode": "audit", "tests": [
            {"image": "nginx:1.25", "expect": "allow"},
            {"image": "nginx", "expect": "allow"},   # the whitelist comes first
            {"image": "redis", "expect": "allow", "note": "redis means redis:latest"},
            {"image": "docker.io/evil/miner:1", "expect": "deny"},
            {"image": "redis", "operation": "pull-all-tags", "expect": "deny"},
            {"image": "localhost:5000/ok/app", "operation": "pull-all-tags", "expect": "allow"},
            {"image": "redis:7", "operation": "run", "expect": "allow"},
            {"image": "sha256:" + "a" * 64, "operation": "run", "expect": "allow"},
            {"image": "nginx:1", "operation": "tag", "target": "redis", "expect": "allow"},
            {"image": "redis:7", "operation": "service", "expect": "deny"},
            {"image": "localhost:5000/ok/plugin:1", "operation": "plugin install", "expect": "allow"},
            {"operation": "build", "expect": "deny"}]})
        self.assertEqual(dip.policy_test_failures(policy), [
            '"tests"[2] (pull of redis): expected allow, but pull of redis:latest denied: blacklist rule ":latest$"'
            ' matches [blacklist[0] ":latest$"] (redis means redis:latest)',
            '"tests"[3] (pull of docker.io/evil/miner:1): expected deny, but pull of evil/miner:1 allowed: no rule'
            ' matches and defaultAllow is true [defaultAllow]',
            '"tests"[7] (run of sha256:' + "a" * 64 + '): expected allow, but run of sha256:' + "a" * 64 + ' denied:'
            ' cannot resolve the image: dockerd looks a hex name up as an image ID; give --docker-host to judge it'
            ' [image-id]',
            '"tests"[8] (tag of nginx:1 as redis): expected allow, but tag of nginx:1 as redis:latest denied:'
            ' blacklist rule ":latest$" matches for the new name [blacklist[0] ":latest$"]',
            '"tests"[9] (service of redis:7): expected deny, but service of redis:7 allowed: no rule matches and'
            ' defaultAllow is true [defaultAllow]',
            '"tests"[11] (build): expected deny, but build allowed: \'allowBuild\' is not set and defaultAllow is'
            ' true; the plugin cannot see the Dockerfile or the base images dockerd will pull for it [allowBuild]',
        ])
        with self.assertRaises(dip.PolicyTestsFailed) as caught, tempfile.NamedTemporaryFile("w", suffix=".json") as file:
            json.dump({"whitelist": ["^nginx:"], "tests": [{"image": "redis:7", "expect": "allow"},
                                                          {"image": "nginx:1", "expect": "allow"}]}, file)
            file.flush()
            self.assertEqual(dip.load_policy(file.name).tests[0].image, "redis:7")   # loads; only tested loads refuse
            dip.load_tested_policy(file.name)
        self.assertEqual(str(caught.exception), f'{file.name}: "tests": 1 of 2 tests fail: "tests"[0] (pull of'
                         ' redis:7): expected allow, but pull of redis:7 denied: no whitelist rule matches and'
                         ' defaultAllow is false [defaultAllow]')
        self.assertIsInstance(caught.exception, dip.ConfigError)


# --------------------------------------------------------------------------
# Request classification
# --------------------------------------------------------------------------

def client_certificate(directory: str, name: str, subject: str, ca: tuple[str, str] | None = None) -> tuple[str, str]:
    """A P-256 key and certificate made with openssl: self-signed (a CA) or signed by ca (key, certificate)."""
    key, certificate = f"{directory}/{name}.key", f"{directory}/{name}.pem"
    if ca is None:
        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                        "-keyout", key, "-out", certificate, "-subj", subject, "-days", "2"],
                       check=True, capture_output=True)
        return key, certificate
    extensions = f"{directory}/{name}.ext"
    Path(extensions).write_text("extendedKeyUsage = clientAuth, serverAuth\nsubjectAltName = IP:127.0.0.1\n")
    subprocess.run(["openssl", "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout",
                    key, "-out", f"{directory}/{name}.csr", "-subj", subject], check=True, capture_output=True)
    subprocess.run(["openssl", "x509", "-req", "-in", f"{directory}/{name}.csr", "-CA", ca[1], "-CAkey", ca[0],
                    "-CAcreateserial", "-out", certificate, "-days", "2", "-extfile", extensions],
                   check=True, capture_output=True)
    return key, certificate


def tls_fields(certificate: str, user: str) -> dict[str, Any]:
    """What dockerd adds to an AuthZReq for a client it verified (moby's authorization middleware)."""
    return {"User": user, "UserAuthNMethod": "TLS",
            "RequestPeerCertificates": [base64.b64encode(Path(certificate).read_bytes()).decode()]}


class TestScopes(unittest.TestCase):
    """The scopes key: whole components, the most specific scope governing, conditions, callers, exceptions."""

    def decide(self, policy: dip.Policy, image: str) -> tuple[bool, str]:
        verdict = policy.evaluate(parse_reference(image))
        return verdict.allow, verdict.rule.split()[0]

    def test_the_regex_mistakes_written_as_scopes_admit_nothing_else(self):
        policy = policy_of({"scopes": [{"allow": "docker.io/library/docker"}, {"allow": "docker.io/library/nginx"},
                                       {"allow": "docker.io/library/redis"}, {"allow": "registry.example.com"},
                                       {"allow": "quay.io/calico/node"}]})
        for image, allow in [("docker:24", True), ("docker/compose:2", False), ("dockerevil:1", False),
                             ("nginx:1.25", True), ("nginx:5000/evil/miner:1", False), ("nginx-evil:1", False),
                             ("nginxevil/miner:1", False), ("docker.io/nginxevil/miner:1", False),
                             ("redis:7", True), ("redisevil/miner:1", False),
                             ("registry.example.com/team/app:1", True), ("registry-example.com/team/app:1", False),
                             ("registry.example.com.evil.example/app:1", False),
                             ("registry.example.com:5000/app:1", False),
                             ("quay.io/calico/node:v3", True), ("quay.io/calico/node-evil:1", False),
                             ("quay.io/calico/node/evil:1", True), ("quay.io/calico/nodes:1", False),
                             ("quay.io/calico:1", False), ("localhost/evil:1", False)]:
            with self.subTest(image):
                self.assertEqual(self.decide(policy, image)[0], allow)

    def test_the_most_specific_scope_with_entries_governs_whatever_the_order(self):
        entries = [{"allow": "quay.io"}, {"deny": "quay.io/evil"}, {"allow": "quay.io/evil/good"},
                   {"deny": "*.corp.example.com"}, {"allow": "registry.corp.example.com"},
                   {"allow": "*.eu.corp.example.com:5000"}, {"deny": "*.example.com"}]
        expected = [("quay.io/calico/node:1", True, '"quay.io"'), ("quay.io/evil/miner:1", False, '"quay.io/evil"'),
                    ("quay.io/evil/good:1", True, '"quay.io/evil/good"'),
                    ("quay.io/evil/good/sub:1", True, '"quay.io/evil/good"'),
                    ("registry.corp.example.com/app:1", True, '"registry.corp.example.com"'),
                    ("other.corp.example.com/app:1", False, '"*.corp.example.com"'),
                    ("registry.corp.example.com:5000/app:1", False, '"*.corp.example.com"'),
                    ("a.eu.corp.example.com:5000/app:1", True, '"*.eu.corp.example.com:5000"'),
                    ("a.eu.corp.example.com/app:1", False, '"*.corp.example.com"'),
                    ("example.com/app:1", False, "defaultAllow"), ("other.example.com/app:1", False, '"*.example.com"')]
        rng = random.Random(7)
        for _ in range(5):
            shuffled = rng.sample(entries, len(entries))
            policy = policy_of({"scopes": shuffled, "defaultAllow": False})
            for image, allow, scope in expected:
                with self.subTest(image=image, order=shuffled):
                    verdict = policy.evaluate(parse_reference(image))
                    self.assertEqual(verdict.allow, allow, verdict.reason)
                    self.assertIn(scope, verdict.reason if scope != "defaultAllow" else verdict.rule)
        self.assertEqual(self.decide(policy_of({"scopes": entries, "defaultAllow": True}), "ghcr.io/x/y:1"),
                         (True, "defaultAllow"))

    def test_conditions_tags_digests_and_the_governed_scope_denies_what_nothing_allows(self):
        digest = "sha256:" + "a" * 64
        policy = policy_of({"scopes": [{"allow": "docker.io/library/nginx", "tags": ["1.*", "stable"]},
                                       {"deny": "docker.io/library/nginx", "tags": ["*-debug"]},
                                       {"allow": "registry.example.com/releases", "digestOnly": True}],
                            "defaultAllow": True})
        for image, allow, why in [
                ("nginx:1.25", True, "scopes[0]"), ("nginx:stable", True, "scopes[0]"),
                ("nginx:1.25-debug", False, "scopes[1]"), ("nginx:2", False, "no entry there allows it"),
                # A tag pattern's dot is a dot, and the pattern covers the whole tag.
                ("nginx:1x25", False, "no entry there allows it"), ("nginx:stable2", False, "no entry there allows it"),
                ("nginx", False, "tags 1.*, stable"), (f"nginx@{digest}", False, "a digest has no tag"),
                (f"nginx:1.25@{digest}", False, "a digest has no tag"),
                ("registry.example.com/releases/app:1", False, "references by digest only"),
                (f"registry.example.com/releases/app@{digest}", True, "scopes[2]"),
                ("redis:7", True, "defaultAllow")]:
            with self.subTest(image):
                verdict = policy.evaluate(parse_reference(image))
                self.assertEqual(verdict.allow, allow, verdict.reason)
                self.assertIn(why, verdict.reason + verdict.rule)
        nginx = parse_reference("nginx")
        self.assertFalse(policy.evaluate_all_tags(nginx).allow)
        self.assertTrue(policy_of({"scopes": [{"allow": "docker.io/library/nginx"}]}).evaluate_all_tags(nginx).allow)
        self.assertFalse(policy_of({"scopes": [{"allow": "docker.io/library/nginx"},
                                               {"deny": "docker.io/library/nginx", "tags": ["*-debug"]}]})
                         .evaluate_all_tags(nginx).allow)
        # A blacklist rule may deny some of the tags: the scope cannot answer for all of them.
        verdict = policy_of({"scopes": [{"allow": "docker.io/library/nginx"}], "blacklist": [":latest$"]}) \
            .evaluate_all_tags(nginx)
        self.assertEqual((verdict.allow, verdict.rule), (False, "all-tags"))

    def test_regex_rules_decide_first_and_aliases_are_caught_by_denies_only(self):
        policy = policy_of({"whitelist": ["^quay\\.io/calico/"], "blacklist": ["^evil/"],
                            "scopes": [{"deny": "quay.io"}, {"allow": "docker.io/evil"}, {"allow": "docker.io/library"},
                                       {"deny": "docker.io/library/redis"}], "defaultAllow": True})
        for image, allow, rule in [("quay.io/calico/node:1", True, "whitelist[0]"),
                                   ("quay.io/other/x:1", False, "scopes[0]"),
                                   ("quay.io:443/other/x:1", False, "scopes[0]"),
                                   ("evil/miner:1", False, "blacklist[0]"), ("nginx:1", True, "scopes[2]"),
                                   ("registry-1.docker.io/library/nginx:1", True, "defaultAllow"),
                                   ("registry-1.docker.io/library/redis:7", False, "scopes[3]"),
                                   ("index.docker.io/library/redis:7", False, "scopes[3]")]:
            with self.subTest(image):
                self.assertEqual(self.decide(policy, image), (allow, rule))
        # An allow scope does not admit another spelling of its registry.
        strict = policy_of({"scopes": [{"allow": "quay.io/calico"}]})
        self.assertEqual(self.decide(strict, "quay.io:443/calico/node:1"), (False, "defaultAllow"))
        self.assertEqual(self.decide(strict, "quay.io/calico/node:1"), (True, "scopes[0]"))

    def test_another_spelling_of_a_registry_is_denied_whatever_denies_its_usual_name(self):
        tags = policy_of({"defaultAllow": True, "scopes": [{"allow": "127.0.0.1:5000/app", "tags": ["1.*"]}]})
        for image, allow in [("127.0.0.1:5000/app:bad", False), ("127.0.0.1:05000/app:bad", False),
                             ("127.0.0.1:05000/app:1.2", True), ("127.0.0.1:5000/app:1.2", True)]:
            with self.subTest(image):
                self.assertEqual(tags.evaluate(parse_reference(image)).allow, allow)
        self.assertIn("for 127.0.0.1:5000/app:bad, the same repository under its usual name",
                      tags.evaluate(parse_reference("127.0.0.1:05000/app:bad")).reason)
        wildcard = policy_of({"scopes": [{"allow": "*.example.com"},
                                         {"allow": "registry.example.com/app", "tags": ["1.*"]}]})
        self.assertFalse(wildcard.evaluate(parse_reference("registry.example.com:443/app:2")).allow)
        self.assertTrue(wildcard.evaluate(parse_reference("registry.example.com:443/app:1.2")).allow)
        debug = policy_of({"defaultAllow": True, "scopes": [{"allow": "docker.io/library/nginx"},
                                                            {"deny": "docker.io/library/nginx", "tags": ["*-debug"]}]})
        for image in ("nginx", "registry-1.docker.io/library/nginx", "docker.io:443/library/nginx"):
            with self.subTest(image):
                self.assertFalse(debug.evaluate_all_tags(parse_reference(image)).allow)
        self.assertFalse(debug.evaluate(parse_reference("registry-1.docker.io/library/nginx:1-debug")).allow)
        self.assertTrue(debug.evaluate(parse_reference("registry-1.docker.io/library/nginx:1")).allow)

    def test_exceptions_end_on_time_and_the_scope_falls_back(self):
        now = time.time()
        soon = datetime.datetime.fromtimestamp(now + 60, datetime.timezone.utc).isoformat()
        policy = policy_of({"scopes": [{"deny": "ghcr.io"},
                                       {"allow": "ghcr.io/vendor/tool", "until": soon, "ticket": "SEC-142",
                                        "note": "until 2.0"},
                                       {"allow": "ghcr.io/vendor/old", "until": "2020-01-31"}]})
        verdict = dataclasses.replace(policy, at=now).evaluate(parse_reference("ghcr.io/vendor/tool:1"))
        self.assertEqual((verdict.allow, verdict.rule), (True, "scopes[1]"))
        self.assertIn(f"until {soon}; ticket SEC-142; note: until 2.0", verdict.reason)
        for at in (now + 61, now + 86400):
            verdict = dataclasses.replace(policy, at=at).evaluate(parse_reference("ghcr.io/vendor/tool:1"))
            self.assertEqual((verdict.allow, verdict.rule), (False, "scopes[0]"))
        self.assertEqual(self.decide(policy, "ghcr.io/vendor/old:1"), (False, "scopes[0]"))
        day = policy_of({"scopes": [{"allow": "ghcr.io/x", "until": "2027-01-31"}]})
        end = datetime.datetime(2027, 2, 1, tzinfo=datetime.timezone.utc).timestamp()
        self.assertTrue(dataclasses.replace(day, at=end - 1).evaluate(parse_reference("ghcr.io/x/y:1")).allow)
        self.assertFalse(dataclasses.replace(day, at=end).evaluate(parse_reference("ghcr.io/x/y:1")).allow)

    def test_a_remembered_answer_does_not_outlive_the_exception_that_gave_it(self):
        directory = tempfile.mkdtemp(prefix="dip")
        self.addCleanup(shutil.rmtree, directory)
        config = Path(directory, "policy.json")
        start = time.time()
        until = datetime.datetime.fromtimestamp(start + 100, datetime.timezone.utc).isoformat()
        config.write_text(json.dumps({"scopes": [{"allow": "ghcr.io/vendor", "until": until}]}))
        plugin = dip.Plugin(str(config), dip.load_tested_policy,
                            dip.Log("info", io.StringIO()), dip.DockerAPI("unix:///nonexistent"))
        body = json.dumps(pull("/v1.41/images/create?fromImage=ghcr.io/vendor/tool&tag=1")).encode()

        def allowed(at: float) -> bool:
            with mock.patch.object(dip.time, "time", return_value=at):
                return json.loads(plugin.authorize(body).partition(b"\r\n\r\n")[2])["Allow"]
        self.assertTrue(allowed(start + 1))
        self.assertTrue(allowed(start + 2))   # remembered
        self.assertIn(body, plugin.current.answers)
        self.assertFalse(allowed(start + 101))
        self.assertFalse(allowed(start + 102))

    def test_callers_come_from_the_client_certificate_dockerd_verified(self):
        directory = tempfile.mkdtemp(prefix="dip")
        self.addCleanup(shutil.rmtree, directory)
        ca = client_certificate(directory, "ca", "/CN=test CA")
        _, alice = client_certificate(directory, "alice", "/O=Corp/OU=team-a/OU=ops/CN=alice", ca)
        _, bob = client_certificate(directory, "bob", "/O=Corp/OU=team-b/CN=bob", ca)
        self.assertEqual(dip.caller_of(tls_fields(alice, "alice")),
                         dip.Caller(True, "alice", ("Corp",), ("team-a", "ops")))
        for fields in [tls_fields(alice, "bob"), dict(tls_fields(alice, "alice"), UserAuthNMethod="basic"),
                       dict(tls_fields(alice, "alice"), RequestPeerCertificates=["bm90IGEgY2VydA=="]),
                       dict(tls_fields(alice, "alice"), RequestPeerCertificates=None), {"User": "alice"}]:
            with self.subTest(fields):
                self.assertEqual(dip.caller_of(fields), dip.Caller(True, unreadable=True))
        self.assertEqual(dip.caller_of({}), dip.UNIDENTIFIED)
        policy = policy_of({"scopes": [{"allow": "registry.example.com/team-a", "callers": ["ou:team-a"]},
                                       {"allow": "registry.example.com/team-a", "callers": ["cn:ci-*"]},
                                       {"deny": "registry.example.com/team-a", "callers": ["cn:mallory"]},
                                       {"allow": "registry.example.com/public", "callers": ["unidentified", "o:Corp"]}],
                            "defaultAllow": True})
        uri = "/v1.41/images/create?fromImage=registry.example.com/team-a/app&tag=1"
        public = "/v1.41/images/create?fromImage=registry.example.com/public/app&tag=1"
        for fields, team, everyone in [(tls_fields(alice, "alice"), True, True), (tls_fields(bob, "bob"), False, True),
                                       ({}, False, True), (tls_fields(alice, "bob"), False, False)]:
            with self.subTest(fields.get("User")):
                decision = dip.decide(policy, dict(pull(uri), **fields), NO_DOCKER)
                self.assertEqual(decision.allow, team, decision.reason)
                self.assertEqual(dip.decide(policy, dict(pull(public), **fields), NO_DOCKER).allow, everyone)
        decision = dip.decide(policy, dict(pull(uri), **tls_fields(bob, "bob")), NO_DOCKER)
        self.assertIn("the caller is cn:bob o:Corp ou:team-b", decision.reason)
        self.assertIn('"caller": {"cn": "bob", "o": ["Corp"], "ou": ["team-b"], "unreadable": false}',
                      decision.log_fields)
        # An unreadable certificate: no allow holds for it, every deny does.
        denying = policy_of({"scopes": [{"deny": "registry.example.com", "callers": ["cn:mallory"]},
                                        {"allow": "registry.example.com"}]})
        self.assertFalse(dip.decide(denying, dict(pull(uri), **tls_fields(alice, "bob")), NO_DOCKER).allow)
        self.assertTrue(dip.decide(denying, dict(pull(uri), **tls_fields(alice, "alice")), NO_DOCKER).allow)
        # A cn glob covers the whole name: cn:mallory is not mallory2.
        for cn, allow in [("mallory", False), ("mallory2", True), ("xmallory", True)]:
            with self.subTest(cn):
                asked = denying.asked_by(dip.caller_of_selectors([f"cn:{cn}"]))
                self.assertEqual(dip.judge(asked, dip.PULL, "registry.example.com/team-a/app:1").allow, allow)
        # --check --caller and a policy test's caller judge as that caller.
        judged = dataclasses.replace(policy.asked_by(dip.caller_of_selectors(["cn:ci-runner"])))
        self.assertTrue(dip.judge(judged, dip.PULL, "registry.example.com/team-a/app:1").allow)
        self.assertFalse(dip.judge(policy, dip.PULL, "registry.example.com/team-a/app:1").allow)

    def test_scope_configuration_errors(self):
        for entry, error in [
                ({"allow": "nginx"}, 'does not start with a registry host: write the whole name, e.g.'
                                     ' docker.io/library/nginx or docker.io/nginx'),
                ({"allow": "Quay.io/calico"}, "is not a scope"), ({"allow": "quay.io/calico/"}, "is not a scope"),
                ({"allow": "quay.io/Calico"}, "is not a scope"), ({"allow": "quay.io/calico:v1"}, "is not a scope"),
                ({"allow": "*.*.example.com"}, "is not a scope"), ({"allow": "registry-1.docker.io/x"}, "as docker.io"),
                ({"allow": "quay.io", "deny": "quay.io"}, 'needs exactly one of "allow" and "deny"'), ({}, "exactly one"),
                ({"allow": "quay.io", "until": "tomorrow"}, '"until" must be a date'),
                ({"allow": "quay.io", "until": "2027-01-31T10:00:00"}, "with its zone"),
                ({"allow": "quay.io", "tags": ["1.*/x"]}, "can match no tag"),
                ({"allow": "quay.io", "callers": ["team-a"]}, 'caller "team-a" is not cn:NAME'),
                ({"allow": "quay.io", "tag": ["1"]}, 'unknown key "tag" (did you mean "tags"?)'),
                ({"allow": "quay.io", "digestOnly": "yes"}, '"scopes"[0]."digestOnly": must be true or false')]:
            with self.subTest(entry):
                with self.assertRaises(dip.ConfigError) as caught:
                    policy_of({"scopes": [entry]})
                self.assertIn(error, str(caught.exception))
        policy = policy_of({"SCOPES": [{"Allow": "quay.io", "TAGS": None, "until": "2027-01-31T10:00:00Z"}]})
        self.assertEqual(policy.configuration()["scopes"], [{"allow": "quay.io", "until": "2027-01-31T10:00:00Z"}])

    def test_policy_tests_judge_as_a_caller_and_at_a_time(self):
        policy = policy_of({"scopes": [{"allow": "ghcr.io/team", "callers": ["ou:team-a"], "until": "2027-01-31"}],
                            "tests": [{"image": "ghcr.io/team/app:1", "caller": "ou:team-a", "at": "2027-01-31",
                                       "expect": "allow"},
                                      {"image": "ghcr.io/team/app:1", "caller": "ou:team-a", "at": "2027-02-01",
                                       "expect": "allow"},
                                      {"image": "ghcr.io/team/app:1", "at": "2027-01-01", "expect": "allow"}]})
        failures = dip.policy_test_failures(policy)
        self.assertEqual(len(failures), 2, failures)
        self.assertTrue(failures[0].startswith('"tests"[1] (pull of ghcr.io/team/app:1 by ou:team-a at 2027-02-01):'
                                               " expected allow, but pull of ghcr.io/team/app:1 denied"), failures)
        self.assertIn("is for callers ou:team-a; the caller is unidentified", failures[1])
        for test, error in [({"image": "NGINX", "expect": "deny"}, '"image": invalid reference'),
                            ({"image": "x", "caller": "team", "expect": "deny"}, '"caller" must be cn:NAME'),
                            ({"image": "x", "at": "soon", "expect": "deny"}, '"at" must be a date')]:
            with self.subTest(test), self.assertRaises(dip.ConfigError) as caught:
                policy_of({"tests": [test]})
            self.assertIn(error, str(caught.exception))

    def test_validate_names_the_mistakes_scopes_still_allow(self):
        now = datetime.datetime(2026, 12, 7, tzinfo=datetime.timezone.utc).timestamp()
        policy = policy_of({"whitelist": ["^quay\\.io/"], "scopes": [
            {"allow": "quay.io/calico"}, {"allow": "*.amazonaws.com"}, {"deny": "*.amazonaws.com"},
            {"allow": "docker.io/nginx"}, {"allow": "docker.io/library/nginx", "tags": ["-x"]},
            {"deny": "docker.io/library/nginx"}, {"allow": "ghcr.io/vendor/tool", "until": "2026-01-31"},
            {"allow": "ghcr.io/vendor/other", "until": "2026-12-10", "ticket": "SEC-1"},
            {"allow": "ghcr.io/vendor/later", "until": "2027-12-10"}]})
        self.assertEqual(dip.scope_warnings(policy, now), [
            'scopes[0] allow "quay.io/calico" is dead: whitelist[0] "^quay\\\\.io/" decides every image in its scope'
            " first",
            'scopes[1] allow "*.amazonaws.com" allows every registry under amazonaws.com, where anyone can publish'
            " images; name your own registry or namespace instead",
            'scopes[1] allow "*.amazonaws.com" can never allow: scopes[2] deny "*.amazonaws.com" denies everything'
            " in its scope",
            'scopes[3] allow "docker.io/nginx" is the Docker Hub namespace nginx (nginx/…), not the official image'
            " nginx, which is docker.io/library/nginx",
            'scopes[4] allow "docker.io/library/nginx": tags "-x" matches no tag (a tag starts with a letter, digit'
            " or _)",
            'scopes[4] allow "docker.io/library/nginx" can never allow: scopes[5] deny "docker.io/library/nginx"'
            " denies everything in its scope",
            'scopes[6] allow "ghcr.io/vendor/tool" ended at 2026-01-31: it decides nothing now; remove it',
            'scopes[7] allow "ghcr.io/vendor/other" ends at 2026-12-10, in 4.0 days (ticket SEC-1)'])


class TestRequests(unittest.TestCase):
    policy = policy_of({"whitelist": ["^localhost:5000/ok/", "^nginx:"], "defaultAllow": False,
                        "message": "See https://wiki.example/images"})

    def decide(self, request: dict[str, Any], policy: dip.Policy | None = None,
               docker: dip.Docker = NO_DOCKER) -> dip.Decision:
        return dip.decide(policy or self.policy, request, docker)

    def assertDecision(self, request: dict[str, Any], allow: bool, reason: str = "", **kwargs: Any) -> dip.Decision:
        decision = self.decide(request, **kwargs)
        self.assertEqual(decision.allow, allow, decision)
        self.assertIn(reason, decision.message(self.policy))
        return decision

    def test_routes_allowed_and_denied(self):
        run_ok, run_bad = {"Image": "nginx:1.25"}, {"Image": "redis:7"}
        service = lambda image: {"Name": "s", "TaskTemplate": {"ContainerSpec": {"Image": image}}}
        table = [
            (pull("/v1.41/images/create?fromImage=nginx&tag=1.25"), True, "pull of nginx:1.25 allowed"),
            (pull("/v1.41/images/create?fromImage=docker.io%2Flibrary%2Fredis&tag=7"), False,
             "pull of redis:7 denied: no whitelist rule matches and defaultAllow is false. See https://wiki"),
            (authz("POST", "/v1.41/containers/create", run_ok), True, "run of nginx:1.25 allowed"),
            (authz("POST", "/v1.41/containers/create?name=x", run_bad), False, "run of redis:7 denied"),
            (authz("POST", "/v1.41/services/create", service("nginx:1@" + DIGEST)), True, "service of nginx:1@"),
            (authz("POST", "/v1.41/services/create", service("redis:7@" + DIGEST)), False, "service of redis:7@"),
            (authz("POST", "/v1.41/services/abc/update?version=3", service("nginx:2")), True, "service"),
            (authz("POST", "/v1.41/services/abc/update?version=3", service("redis")), False, "service of redis"),
            (authz("POST", "/v1.41/services/create", {"TaskTemplate": {"Runtime": "plugin", "PluginSpec": {
                "Remote": "evil/plugin"}}}), False, "service of evil/plugin:latest denied"),
            (authz("POST", "/v1.41/swarm/init", {"ListenAddr": "0.0.0.0"}), False,
             "swarm denied: 'allowSwarm' is not set and defaultAllow is false; a swarm manager can then run any"),
            (authz("POST", "/v1.41/swarm/join", {"RemoteAddrs": ["10.0.0.1"]}), False, "swarm denied"),
            (authz("POST", "/v1.41/plugins/pull?remote=localhost:5000/ok/plugin:1&name=p", []), True,
             "plugin install of localhost:5000/ok/plugin:1 allowed"),
            (authz("POST", "/v1.41/plugins/pull?remote=vieux/sshfs", []), False, "plugin install of vieux/sshfs"),
            (authz("POST", "/v1.41/plugins/vieux/sshfs:1/upgrade?remote=vieux/sshfs:2", []), False,
             "plugin install of vieux/sshfs:2 denied"),
            (authz("POST", "/v1.41/plugins/p/upgrade?remote=nginx:2", []), True, "plugin install of nginx:2"),
            (pull("/v1.41/images/nginx:1.25/tag?repo=nginx&tag=prod"), True, "tag of nginx:1.25 as nginx:prod allowed"),
            (pull("/v1.41/images/redis:7/tag?repo=nginx&tag=prod"), False, "tag of redis:7 denied"),
            (pull("/v1.41/images/nginx:1.25/tag?repo=redis&tag=7"), False,
             "tag of nginx:1.25 as redis:7 denied: no whitelist rule matches and defaultAllow is false for the new"),
            (authz("POST", "/v1.41/images/load?quiet=1", headers={"Content-Type": "application/x-tar"}), False,
             "load denied: 'allowLoad' is not set and defaultAllow is false; the plugin cannot see which images"),
            (authz("POST", "/v1.41/images/create?fromSrc=-&repo=imp", headers={"Content-Type": "text/plain"}),
             False, "import denied: 'allowImport'"),
            (authz("POST", "/v1.41/build?t=x", headers={"Content-Type": "application/x-tar"}), False,
             "build denied: 'allowBuild'"),
            (authz("POST", "/session"), False, "build denied"),
            (authz("POST", "/grpc"), False, "build denied"),
            (authz("POST", "/v1.41/commit?container=c1&repo=x", None), False, "commit denied: 'allowCommit'"),
            (authz("POST", "/v1.41/plugins/create?name=p"), False, "plugin-create denied"),
        ]
        for request, allow, reason in table:
            with self.subTest(request["RequestUri"]):
                self.assertDecision(request, allow, reason)

    def test_plugin_pulls_and_tags_that_cannot_be_judged(self):
        no_remote = "plugin install denied: a plugin pull without a 'remote' image"
        digest = "tag denied: cannot tag with a digest reference"
        for request, reason in [
            (authz("POST", "/v1.41/plugins/pull?name=p", []), no_remote),
            (authz("POST", "/v1.41/plugins/pull?remote=&name=p", []), no_remote),
            (authz("POST", "/v1.41/plugins/p/upgrade", []), no_remote),
            (pull(f"/v1.41/images/nginx:1/tag?repo=nginx@{DIGEST}"), digest),
            (pull(f"/v1.41/images/nginx:1/tag?repo=nginx:2@{DIGEST}"), digest),
            (pull("/v1.41/images/nginx:1/tag?repo=nginx&tag=bad:tag"), "tag denied: invalid tag 'bad:tag'"),
            (pull("/v1.41/images/nginx:1/tag?repo=nginx&tag=-x"), "tag denied: invalid tag '-x'"),
            (pull(f"/v1.41/images/nginx:1/tag?repo=nginx&tag={DIGEST}"), f"tag denied: invalid tag '{DIGEST}'"),
            (pull("/v1.41/images/nginx:1/tag?tag=2"), "tag denied: invalid reference format: ''"),
        ]:
            with self.subTest(request["RequestUri"]):
                decision = self.assertDecision(request, False, reason + ". See https://wiki.example/images")
                self.assertEqual(decision.rule, "unreadable")
        # Their honest twins.
        self.assertDecision(pull("/v1.41/images/nginx:1/tag?repo=nginx&tag=2"), True, "tag of nginx:1 as nginx:2")
        self.assertDecision(authz("POST", "/v1.41/plugins/p/upgrade?remote=nginx:2", []), True, "plugin install of")

    def test_pulls_and_tags_through_registry_aliases_meet_the_blacklist_as_written(self):
        # The CLI sends "pull registry-1.docker.io/evil/miner@sha256:…" as fromImage and a tag that
        # holds the digest: the usual name the blacklist sees carries that tag or digest too.
        policy = policy_of({"blacklist": ["^evil/", "^quay\\.io/evil/", "^team/app:1$", ":latest$"],
                            "defaultAllow": True})
        usual = ", the same repository under its usual name"
        for from_image, tag, allow, reason in [
            ("registry-1.docker.io/evil/miner", DIGEST, False, f'"^evil/" matches evil/miner@{DIGEST}{usual}'),
            ("docker.io:443/evil/miner", "1", False, f'"^evil/" matches evil/miner:1{usual}'),
            ("quay.io:443/evil/x", DIGEST, False, f'"^quay\\\\.io/evil/" matches quay.io/evil/x@{DIGEST}{usual}'),
            ("registry-1.docker.io/team/app", "1", False, f'"^team/app:1$" matches team/app:1{usual}'),
            ("registry-1.docker.io/team/app", "2", True, "no rule matches and defaultAllow is true"),
        ]:
            with self.subTest(from_image=from_image, tag=tag):
                self.assertDecision(pull(f"/v1.41/images/create?fromImage={from_image}&tag={tag}"), allow, reason,
                                    policy=policy)
        tag = pull("/v1.41/images/redis:7/tag?repo=registry-1.docker.io/team/app&tag=1")
        self.assertDecision(tag, False, f'"^team/app:1$" matches team/app:1{usual} for the new name', policy=policy)

    def test_a_first_component_that_is_no_domain_is_judged(self):
        # "my_registry.example.com" has a dot, so distribution reads it as a registry, and "_" is not
        # allowed in a host name: dockerd refuses the name, and so does the plugin, saying why.
        for request, operation in [(pull("/v1.41/images/create?fromImage=my_registry.example.com/app&tag=1"),
                                    "pull or import"),
                                   (authz("POST", "/v1.41/containers/create", {"Image": "my_registry.example.com/app:1"}),
                                    "run")]:
            with self.subTest(request["RequestUri"]):
                decision = self.decide(request, policy=policy_of({"defaultAllow": True}))
                self.assertEqual((decision.allow, decision.operation.name, decision.rule), (False, operation, "unreadable"))
                self.assertIn("'my_registry.example.com' is not a valid registry host name", decision.reason)

    def test_opaque_operations_follow_their_setting(self):
        routes = {"/v1.41/images/load": "load", "/v1.41/images/create?fromSrc=-&repo=x": "import",
                  "/v1.41/build": "build", "/session": "build", "/grpc": "build",
                  "/v1.41/commit?container=c": "commit", "/v1.41/plugins/create?name=p": "plugin-create",
                  "/v1.41/swarm/init": "swarm", "/swarm/join": "swarm"}
        keys = {"allowLoad", "allowImport", "allowBuild", "allowCommit", "allowPluginCreate", "allowSwarm"}
        for allowed in (True, False):
            policy = policy_of({"defaultAllow": not allowed, **{key: allowed for key in keys}})
            for uri, operation in routes.items():
                with self.subTest(uri=uri, allowed=allowed):
                    decision = self.decide(authz("POST", uri), policy=policy)
                    self.assertEqual((decision.allow, decision.operation.name), (allowed, operation))
        policy = policy_of({"defaultAllow": False, "allowLoad": True, "allowBuild": True})
        for uri, allow in [("/v1.41/images/load", True), ("/v1.41/build", True), ("/session", True),
                           ("/v1.41/images/create?fromSrc=-", False), ("/v1.41/commit?container=c", False)]:
            with self.subTest(uri):
                self.assertEqual(self.decide(authz("POST", uri), policy=policy).allow, allow)
        policy = policy_of({"defaultAllow": True, "blacklist": ["^redis"]})
        self.assertTrue(self.decide(authz("POST", "/v1.41/images/load"), policy=policy).allow)

    def test_benign_calls_are_allowed_without_parsing(self):
        for method, uri in [("GET", "/v1.41/containers/json"), ("GET", "/_ping"), ("HEAD", "/_ping"),
                            ("POST", "/v1.41/containers/abc/start"), ("POST", "/v1.41/containers/abc/stop"),
                            ("POST", "/v1.41/containers/abc/exec"), ("GET", "/v1.41/events"),
                            ("DELETE", "/v1.41/images/redis"), ("POST", "/v1.41/images/redis/push"),
                            ("GET", "not a target at all %zz"), ("POST", "/v1.41/images/create/")]:
            with self.subTest(uri):
                self.assertIs(self.decide(authz(method, uri, b"\xff not json")), dip.BENIGN)

    def test_paths_read_like_dockerd(self):
        denied = "pull of redis:7 denied"
        for uri in ["/v1.41/images%2Fcreate?fromImage=redis&tag=7", "/v1.41/images/%63reate?fromImage=redis&tag=7",
                    "/images/create?fromImage=redis&tag=7", "http://docker/v1.41/images/create?fromImage=redis&tag=7",
                    "unix:/v1.24/images/create?fromImage=redis&tag=7", "//v1.41/images/create?fromImage=redis&tag=7",
                    "/v1.41//images/./create?fromImage=redis&tag=7", "/v1.41/x/../images/create?fromImage=redis&tag=7",
                    "/v1.41/Images/Create?fromImage=redis&tag=7"]:
            with self.subTest(uri):
                self.assertDecision(pull(uri), False, denied)
        # dockerd routes /v{version:[0-9.]+}/…: any run of digits and dots is a version prefix.
        for version in ["/v1.41.0", "/v1", "/v1.4.1.2", "/v.", "/v1..41"]:
            with self.subTest(version):
                self.assertDecision(pull(f"{version}/images/create?fromImage=redis&tag=7"), False, denied)
        self.assertIs(self.decide(pull("/v1.41a/images/create?fromImage=redis&tag=7")), dip.BENIGN)
        self.assertDecision(pull("/v1.41/images/redis%3A7/tag?repo=nginx&tag=1"), False, "tag of redis:7 denied")
        self.assertDecision(pull("/v1.41/images/%zz/create?fromImage=redis"), False, "invalid %-escape")
        self.assertDecision(pull("relative/images/create?fromImage=redis"), False, "neither a path")
        self.assertDecision(pull("http://docker?fromImage=redis"), False, "has no absolute path")
        # Matched however the method and path are spelled, and whatever a name holds (a decoded newline too).
        self.assertDecision(authz("post", "/v1.41/images/create?fromImage=redis&tag=7"), False, denied)
        self.assertDecision(pull("/v1.41/IMAGES/redis:7/TAG?repo=nginx&tag=1"), False, "tag of redis:7 denied")
        self.assertDecision(pull("/v1.41/images/redis%0A:7/tag?repo=nginx&tag=1"), False, "invalid reference")

    def test_query_read_like_go(self):
        for query, allow, reason in [
            ("fromImage=nginx&tag=1&fromImage=redis", True, "pull of nginx:1"),        # first value wins
            ("fromImage=redis&tag=7&fromImage=nginx", False, "pull of redis:7"),
            ("a=x#&fromImage=redis&tag=7", False, "pull of redis:7"),                 # '#' is not a fragment
            ("fromImage=nginx;fromImage=redis&tag=1", False, "';' in the query"),
            ("fromImage=nginx&tag=1%2", False, "invalid %-escape"),
            ("fromImage=%6Eginx&tag=1", True, "pull of nginx:1"),
            ("fromImage=nginx&tag=1+2", False, "invalid tag '1 2'"),                 # '+' is a space
            ("fromImage=Nginx&tag=1", False, "must be lowercase"),
            ("fromImage=nginx&tag=" + DIGEST, True, "pull of nginx@" + DIGEST),       # the original saw nginx:sha256:…
            ("fromImage=localhost:5000/ok/app:1&tag=" + DIGEST, True, "pull of localhost:5000/ok/app@" + DIGEST),
            ("fromImage=redis", False, "pull (all tags) of redis denied: a pull of all tags"),
            ("fromImage=nginx:", True, "pull (all tags) of nginx allowed: whitelist rule"),
            ("fromImage=localhost:5000/ok/app", True, "pull (all tags) of localhost:5000/ok/app allowed"),
            ("fromImage=&fromSrc=-", False, "import denied"),
        ]:
            with self.subTest(query):
                self.assertDecision(pull("/v1.41/images/create?" + query), allow, reason)

    def test_hidden_form_bodies_are_denied(self):
        uri = "/v1.41/images/create?fromImage=nginx&tag=1"
        form = "application/x-www-form-urlencoded"
        cases = [
            ({"Content-Type": form, "Content-Length": "20"}, False, "form-encoded"),
            ({"Content-Type": "Application/X-WWW-Form-Urlencoded; charset=utf-8"}, False, "form-encoded"),
            ({"Content-Type": form, "Content-Length": "0"}, True, "pull of nginx:1"),     # curl -d '': hides nothing
            ({"Content-Type": "text/plain", "Content-Length": "20"}, False, "a body the plugin cannot see"),
            ({"Content-Type": "text/plain"}, False, "a body the plugin cannot see"),   # chunked
            ({"Content-Type": "text/plain", "Content-Length": "0"}, True, "pull of nginx:1"),  # CLI 20.10
            ({"Content-Length": "0"}, True, "pull of nginx:1"),                           # CLI 28
            ({}, True, "pull of nginx:1"),                                               # no Content-Type at all
        ]
        for headers, allow, reason in cases:
            with self.subTest(headers):
                self.assertDecision(authz("POST", uri, headers=headers), allow, reason)
        tag = authz("POST", "/v1.41/images/nginx:1/tag?repo=nginx&tag=2", headers={"Content-Type": form})
        self.assertDecision(tag, False, "form-encoded")
        plugin = authz("POST", "/v1.41/plugins/pull?remote=nginx:1", headers={"Content-Type": "text/plain"})
        self.assertDecision(plugin, False, "a body the plugin cannot see")

    def test_form_body_is_asked_about_before_import(self):
        # With imports allowed, a form body may still carry fromImage: dockerd would pull it.
        policy = policy_of({"whitelist": ["^nginx:"], "allowImport": True})
        form = "application/x-www-form-urlencoded"
        for headers, allow, operation, reason in [
            ({"Content-Type": form, "Content-Length": "24"}, False, "pull or import", "form-encoded body"),
            ({"Content-Type": form}, False, "pull or import", "form-encoded body"),
            # Go lower-cases U+0130 to "i": dockerd reads this body as a form.
            ({"Content-Type": "appl\u0130cation/x-www-form-urlencoded", "Content-Length": "24"}, False,
             "pull or import", "form-encoded body"),
            ({"Content-Type": form, "Content-Length": "0"}, True, "import", "'allowImport' is true"),
            ({"Content-Type": "text/plain"}, True, "import", "'allowImport' is true"),   # docker import
        ]:
            with self.subTest(headers):
                decision = self.decide(authz("POST", "/v1.41/images/create?fromSrc=-&repo=x", headers=headers), policy)
                self.assertEqual((decision.allow, decision.operation.name), (allow, operation), decision)
                self.assertIn(reason, decision.reason)

    def test_json_keys_fold_like_go(self):
        run = lambda body: self.decide(authz("POST", "/v1.41/containers/create", body.encode()))
        service = lambda body: self.decide(authz("POST", "/v1.41/services/create", body.encode()))
        for body, familiar in [
            ('{"Image":"redis:7","\u0131mage":"nginx:1"}', "redis:7"),     # dotless i folds to nothing
            ('{"Image":"redis:7","\u0130MAGE":"nginx:1"}', "redis:7"),     # nor does dotted capital I
            ('{"Image":"redis:7","\uff29mage":"nginx:1"}', "redis:7"),     # nor fullwidth I
            ('{"Image":"nginx:1","iMAGE":"redis:7"}', "redis:7"),           # ASCII folds; the last key wins
            ('{"image":"redis:7","Image":"nginx:1"}', "nginx:1"),
        ]:
            with self.subTest(body):
                self.assertEqual(run(body).familiar, familiar)
        # Honest twin: the allowed image alone is allowed.
        self.assertTrue(run('{"Image":"nginx:1"}').allow)
        for key, familiar in [("ta\u017fktemplate", "redis:7"), ("Tas\u212aTemplate", "redis:7"),   # ſ, Kelvin
                              ("Ta\u0455kTemplate", "nginx:1"), ("TASKTEMPLATE\u0307", "nginx:1")]:
            with self.subTest(key):
                body = f'{{"TaskTemplate":{{"ContainerSpec":{{"Image":"nginx:1"}}}},' \
                       f'"{key}":{{"ContainerSpec":{{"Image":"redis:7"}}}}}}'
                self.assertEqual(service(body).familiar, familiar)

    def test_repeated_objects_merge_like_go(self):
        service = lambda body: self.decide(authz("POST", "/v1.41/services/create", body.encode()))
        merged = service('{"TaskTemplate":{"ContainerSpec":{"Image":"redis:7"}},'
                         '"TaskTemplate":{"PluginSpec":{"Remote":"nginx:1"}}}')
        self.assertEqual((merged.allow, merged.familiar), (False, "redis:7"))   # the container spec runs
        self.assertTrue(service('{"TaskTemplate":{"PluginSpec":{"Remote":"redis:7"}},'
                                '"TaskTemplate":{"ContainerSpec":{"Image":"nginx:1"}}}').allow)
        for body, allow, reason in [
            ('{"TaskTemplate":{"ContainerSpec":{"Image":"redis:7"},"Runtime":"plugin","PluginSpec":{"Remote":'
             '"nginx:1"}}}', True, "service of nginx:1 allowed"),
            ('{"TaskTemplate":{"ContainerSpec":{"Image":"redis:7"},"Runtime":"container"}}', False, "redis:7"),
            ('{"TaskTemplate":{"Runtime":"plugin","ContainerSpec":{"Image":"nginx:1"}}}', False, "no PluginSpec"),
            ('{"TaskTemplate":{"ContainerSpec":{"Image":"nginx:1"},"Runtime":"Plugin"}}', False,
             "unsupported runtime 'Plugin'"),
            ('{"TaskTemplate":{"ContainerSpec":{"Image":"redis:7"}},"TaskTemplate":{"ContainerSpec":null},'
             '"TaskTemplate":{"ContainerSpec":{"Image":"nginx:1"}}}', True, "nginx:1"),   # null resets a pointer
            ('{"TaskTemplate":{"ContainerSpec":{"Image":"redis:7"}},"TaskTemplate":{"ContainerSpec":{"Image":null}}}',
             False, "redis:7"),                                                         # and leaves a string
            ('{"TaskTemplate":{"ContainerSpec":{"Image":"nginx:1"}},"TaskTemplate":null}', True, "nginx:1"),
        ]:
            with self.subTest(body):
                self.assertDecision(authz("POST", "/v1.41/services/create", body.encode()), allow, reason)

    def test_image_mounts_are_judged_like_images(self):
        def run(image: str, *mounts: tuple[str, str], docker: dip.Docker = NO_DOCKER) -> dip.Decision:
            body = {"Image": image, "HostConfig": {"Mounts": [{"Type": kind, "Source": source, "Target": "/m"}
                                                              for kind, source in mounts]}}
            return self.decide(authz("POST", "/v1.41/containers/create", body), docker=docker)
        self.assertDecision(authz("POST", "/v1.41/containers/create",
                                  {"Image": "nginx:1", "HostConfig": {"Mounts": [
                                      {"Type": "bind", "Source": "/srv"}, {"Type": "image", "Source": "redis:7"}]}}),
                            False, "image mount of redis:7 denied: no whitelist rule matches")
        self.assertTrue(run("nginx:1", ("image", "nginx:2"), ("volume", "redis")).allow)
        self.assertTrue(run("nginx:1", ("Image", "redis:7")).allow)   # dockerd rejects any other spelling
        # Swarm's converter upper-cases a service mount's type (mountToGRPC): every spelling of image is one.
        for kind in ("image", "Image", "IMAGE", "iMaGe", "\u0131mage"):   # Go's ToUpper makes the dotless i an I
            with self.subTest(kind):
                body = {"TaskTemplate": {"ContainerSpec": {"Image": "nginx:1", "Mounts": [
                    {"Type": kind, "Source": "redis:7", "Target": "/m"}]}}}
                self.assertDecision(authz("POST", "/v1.41/services/create", body), False, "service of redis:7 denied")
        for kind in ("bind", "volume", "images", ""):
            with self.subTest(kind):
                body = {"TaskTemplate": {"ContainerSpec": {"Image": "nginx:1", "Mounts": [
                    {"Type": kind, "Source": "redis:7", "Target": "/m"}]}}}
                self.assertTrue(self.decide(authz("POST", "/v1.41/services/create", body)).allow)
        image_id = "sha256:" + "c" * 64
        redis = dip.LocalImage(image_id, ("redis:7",))
        docker = FakeDocker({image_id: [redis], "cccc": [redis]})
        self.assertFalse(run("nginx:1", ("image", image_id), docker=docker).allow)
        self.assertFalse(run("nginx:1", ("image", "cccc"), docker=docker).allow)
        # Repeated keys: Go merges the later mount object into the earlier one.
        body = b'{"Image":"nginx:1","HostConfig":{"Mounts":[{"Type":"image","Source":"redis:7"}]},' \
               b'"HostConfig":{"Mounts":[{"Target":"/m"}]}}'
        self.assertDecision(authz("POST", "/v1.41/containers/create", body), False, "image mount of redis:7")
        body = b'{"Image":"nginx:1","HostConfig":{"Mounts":[{"Type":"image","Source":"redis:7"}]},"HostConfig":null}'
        self.assertTrue(self.decide(authz("POST", "/v1.41/containers/create", body)).allow)
        body = b'{"Image":"nginx:1","HostConfig":{"Mounts":[{"Type":"image","Source":"a"},{}]},' \
               b'"HostConfig":{"Mounts":[{}]},"HostConfig":{"Mounts":[{},{}]}}'
        self.assertDecision(authz("POST", "/v1.41/containers/create", body), False, "ambiguous")
        self.assertDecision(authz("POST", "/v1.41/containers/create", {"Image": "nginx:1", "HostConfig": {
            "Mounts": [{"Type": "image"}]}}), False, "the image mount request names no image")

    def test_missing_body_is_denied(self):
        for headers in [{"Content-Type": "application/json", "Content-Length": "2000000"},
                        {"Content-Type": "application/json"}, {}]:
            with self.subTest(headers):
                self.assertDecision(authz("POST", "/v1.41/containers/create", headers=headers), False,
                                    "run denied: dockerd did not forward the request body")
        self.assertDecision(authz("POST", "/v1.41/services/create"), False, "service denied: dockerd did not")

    def test_unreadable_json_bodies_are_denied(self):
        for body, reason in [(b"{", "not valid JSON"), (b"[1]", "where an object belongs"),
                             (b'{"Image": 7}', "where a string belongs"), (b'{"Image": null}', "names no image"),
                             (b"null", "names no image"), (b"\xff\xfe", "not valid JSON"),
                             (b'{"HostConfig": {"Mounts": {}}}', "{} where a list of objects belongs"),
                             (b"[" * 100_000, "nested too deeply"),
                             # JSON's whitespace is four characters: Go refuses a form feed, a no-break space.
                             (b'\x0c{"Image":"nginx:1"}', "not valid JSON"),
                             ('\u00a0{"Image":"nginx:1"}'.encode(), "not valid JSON"),
                             # dockerd reads the first value (engines before 25) or rejects the rest.
                             (b'{"Image":"redis:7"} {"Image":"nginx:1"}', "run of redis:7 denied")]:
            with self.subTest(body):
                self.assertDecision(authz("POST", "/v1.41/containers/create", body), False, reason)
        # Base64 with characters outside its alphabet is no body dockerd sent, however it would decode.
        request = authz("POST", "/v1.41/containers/create", {"Image": "nginx:1"})
        self.assertTrue(self.decide(request).allow)
        for encoded in ["!" + request["RequestBody"], request["RequestBody"] + "\n", request["RequestBody"][:-1]]:
            with self.subTest(encoded):
                self.assertDecision(dict(request, RequestBody=encoded), False, "RequestBody is not valid base64")

    def test_names_that_may_be_short_ids_are_resolved_through_docker(self):
        allowed_id, refused_id, nameless_id = "sha256:" + "b" * 64, "sha256:3f9a" + "1" * 60, "sha256:" + "d" * 64
        allowed = dip.LocalImage(allowed_id, ("redis:7", "nginx:1"))
        refused = dip.LocalImage(refused_id, ("redis:6",))
        nameless = dip.LocalImage(nameless_id, ("moby-dangling@" + DIGEST,))
        named_3f9a = dip.LocalImage("sha256:" + "e" * 64, ("3f9a:latest",))
        # What dockerd answers for each text: the image it resolves now, and every image whose ID it starts.
        docker = FakeDocker({allowed_id: [allowed], "bbbb": [allowed], "b" * 64: [allowed], "3f9a1": [refused],
                             "3f9a": [named_3f9a, refused], "eeee": [named_3f9a], "dddd": [nameless],
                             "cafe": [], "sha256:cafe": [], "c" * 64: []})
        run = lambda image: self.decide(authz("POST", "/v1.41/containers/create", {"Image": image}), docker=docker)
        decision = run(allowed_id)
        self.assertTrue(decision.allow)
        self.assertIn("for its name nginx:1", decision.reason)
        self.assertTrue(run("bbbb").allow)
        self.assertTrue(run("b" * 64).allow)
        decision = run("3f9a1")   # a short ID
        self.assertEqual((decision.allow, decision.image), (False, "docker.io/library/redis:6"))
        self.assertIn("none of its names is allowed", decision.message(self.policy))
        # "3f9a" names an allowed image and starts the ID of a refused one: dockerd
        # takes the name now, the ID once the name is gone. Both must be allowed.
        policy = policy_of({"whitelist": ["^nginx:", "^3f9a:"]})
        decision = self.decide(authz("POST", "/v1.41/containers/create", {"Image": "3f9a"}), policy, docker)
        self.assertEqual((decision.allow, decision.familiar), (False, "3f9a"))
        self.assertIn("redis:6", decision.reason)
        self.assertTrue(self.decide(authz("POST", "/v1.41/containers/create", {"Image": "eeee"}), policy, docker).allow)
        self.assertIn("a nameless image has no name the policy could allow", run("dddd").reason)
        # No image has that name or ID: dockerd answers 404, the CLI pulls the name.
        self.assertEqual(run("cafe").reason, "no whitelist rule matches and defaultAllow is false")
        self.assertTrue(self.decide(authz("POST", "/v1.41/containers/create", {"Image": "cafe"}),
                                    policy_of({"whitelist": ["^cafe:"]}), docker).allow)
        self.assertIn("no such image", run("sha256:cafe").reason)
        self.assertFalse(run("c" * 64).allow)
        self.assertTrue(run("nginx:1").allow)   # a name with a tag is never a short ID

        class Unreachable(FakeDocker):
            def images_for(self, text: str) -> list[dip.LocalImage]:
                raise dip.ImagePolicyError("Docker API at unix:///x: connection refused")
        decision = self.decide(authz("POST", "/v1.41/containers/create", {"Image": "bbbb"}), docker=Unreachable())
        self.assertEqual((decision.allow, decision.reason), (False, "cannot resolve the image: Docker API at"
                                                                    " unix:///x: connection refused"))
        tag = self.decide(pull("/v1.41/images/3f9a1/tag?repo=nginx&tag=x"), docker=docker)
        self.assertEqual((tag.allow, tag.operation), (False, dip.TAG))

    def test_services_by_image_id_and_rollbacks(self):
        refused_id, allowed_id = "sha256:" + "f" * 64, "sha256:" + "a" * 64
        refused, allowed = dip.LocalImage(refused_id, ("redis:7",)), dip.LocalImage(allowed_id, ("nginx:3",))
        docker = FakeDocker({refused_id: [refused], "ffff": [refused], "sha256:ffff": [refused], "sha256:0000": [],
                             allowed_id: [allowed], "aaaa": [allowed], "sha256:aaaa": [allowed]}, services={
            "web": {"Spec": {"TaskTemplate": {"ContainerSpec": {"Image": "nginx:2"}}},
                    "PreviousSpec": {"TaskTemplate": {"ContainerSpec": {"Image": "redis:7@" + DIGEST}}}},
            "api": {"Spec": {"TaskTemplate": {"ContainerSpec": {"Image": "redis:7"}}},
                    "PreviousSpec": {"TaskTemplate": {"ContainerSpec": {"Image": "nginx:1"}}}},
            "new": {"Spec": {"TaskTemplate": {"ContainerSpec": {"Image": "nginx:1"}}}}})
        service = lambda image: {"TaskTemplate": {"ContainerSpec": {"Image": image}}}
        for image, allow, reason in [(refused_id, False, "for redis:7"), ("sha256:0000", False, "no such image"),
                                     ("nginx:1", True, "service of nginx:1 allowed"),
                                     (allowed_id, True, "for its name nginx:3"),
                                     # Only a whole sha256:<64 hex> is not pulled by name first.
                                     ("sha256:ffff", False, "service of sha256:ffff denied: no whitelist rule"),
                                     ("sha256:aaaa", False, "service of sha256:aaaa denied: no whitelist rule"),
                                     # A swarm task pulls a short ID's name first: docker.io/library/aaaa.
                                     ("ffff", False, "service of ffff:latest denied: no whitelist rule"),
                                     ("aaaa", False, "service of aaaa:latest denied: no whitelist rule")]:
            with self.subTest(image):
                self.assertDecision(authz("POST", "/v1.41/services/create", service(image)), allow, reason,
                                    docker=docker)
        named = policy_of({"whitelist": ["^nginx:", "^[0-9a-f]+:latest$"]})
        self.assertTrue(self.decide(authz("POST", "/v1.41/services/create", service("aaaa")), named, docker).allow)
        self.assertFalse(self.decide(authz("POST", "/v1.41/services/create", service("ffff")), named, docker).allow)
        for uri, allow, reason in [
            ("/v1.41/services/web/update?version=9&rollback=previous", False, "service of redis:7@sha256"),
            ("/v1.41/services/api/update?version=9&rollback=previous", True, "service of nginx:1 allowed"),
            ("/v1.41/services/new/update?rollback=previous", False, "no previous spec"),
            ("/v1.41/services/gone/update?rollback=previous", False, "no such service 'gone'"),
            ("/v1.41/services/web/update?rollback=Previous", False, "service of redis:7"),   # body and previous
            ("/v1.41/services/web/update?version=9", True, "service of nginx:1 allowed"),   # the body only
            ("/v1.41/services/create?rollback=previous", True, "service of nginx:1 allowed"),   # only updates roll back
        ]:
            with self.subTest(uri):
                self.assertDecision(authz("POST", uri, service("nginx:1")), allow, reason, docker=docker)
        # Any rollback value but "previous" leaves the body judged too.
        self.assertDecision(authz("POST", "/v1.41/services/api/update?rollback=Previous", service("redis:7")), False,
                            "service of redis:7 denied", docker=docker)
        decision = self.decide(authz("POST", "/v1.41/services/web/update?rollback=previous", service("nginx:1")),
                               docker=None)
        self.assertIn("needs the Docker API", decision.reason)

    def test_decisions_log_what_replay_needs(self):
        logged = lambda decision: json.loads("{" + decision.log_fields)
        fields = lambda decision: {key: logged(decision).get(key) for key in ("operation", "image", "name", "target")}
        run = lambda image, docker=NO_DOCKER: self.decide(authz("POST", "/v1.41/containers/create", {"Image": image}),
                                                          docker=docker)
        # The canonical image says what a pull or a run by name named: nothing more is logged.
        self.assertEqual(fields(self.decide(pull("/v1.41/images/create?fromImage=nginx&tag=1"))),
                         {"operation": "pull", "image": "docker.io/library/nginx:1", "name": None, "target": None})
        self.assertEqual(fields(run("nginx")), {"operation": "run", "image": "docker.io/library/nginx:latest",
                                                "name": None, "target": None})
        # A name dockerd resolved as an image ID at the time.
        docker = FakeDocker({"3f9a": [dip.LocalImage("sha256:3f9a1", ("nginx:1",))], "cafe": []})
        self.assertEqual(fields(run("3f9a", docker)), {"operation": "run", "image": "docker.io/library/nginx:1",
                                                       "name": "3f9a", "target": None})
        self.assertEqual(fields(run("cafe", docker))["name"], "cafe")
        # A tag: its source as named and its new name.
        self.assertEqual(fields(self.decide(pull("/v1.41/images/nginx:1/tag?repo=localhost:5000/ok/nginx&tag=2"))),
                         {"operation": "tag", "image": "localhost:5000/ok/nginx:2", "name": "nginx:1",
                          "target": "localhost:5000/ok/nginx:2"})
        self.assertEqual(fields(self.decide(pull("/v1.41/images/redis:7/tag?repo=nginx&tag=2"))),
                         {"operation": "tag", "image": "docker.io/library/redis:7", "name": None,
                          "target": "docker.io/library/nginx:2"})
        self.assertEqual(fields(self.decide(pull("/v1.41/images/redis:7/tag?repo=Bad"))),
                         {"operation": "tag", "image": "docker.io/library/redis:7", "name": None, "target": None})

    def test_check_run_off_leaves_pull_control(self):
        policy = policy_of({"whitelist": ["^nginx:"], "checkRun": False})
        self.assertTrue(self.decide(authz("POST", "/v1.41/containers/create", {"Image": "redis"}), policy).allow)
        self.assertTrue(self.decide(pull("/v1.41/images/redis/tag?repo=nginx&tag=1"), policy).allow)
        self.assertFalse(self.decide(pull("/v1.41/images/create?fromImage=redis&tag=1"), policy).allow)
        service = {"TaskTemplate": {"ContainerSpec": {"Image": "redis"}}}
        self.assertFalse(self.decide(authz("POST", "/v1.41/services/create", service), policy).allow)

    def test_unreadable_authz_requests_are_denied(self):
        for request in [{}, {"RequestMethod": "POST"}, {"RequestMethod": 1, "RequestUri": "/build"},
                        {"RequestMethod": "POST", "RequestUri": ["/images/create"]},
                        authz("POST", "/v1.41/images/create?fromImage=nginx&tag=1", RequestHeaders=[1]),
                        authz("POST", "/v1.41/containers/create", RequestBody="not base64!"),
                        authz("POST", "/v1.41/containers/create", RequestBody=17)]:
            with self.subTest(request):
                self.assertFalse(self.decide(request).allow)


# What dockerd 28's encoding/json makes of a request body, as the program
# below prints it for each "KIND BASE64" line on its input: the images
# dockerd would use, a spec error, or a decode error. Its structs have the
# shapes of moby's API types (pointers, embedded pointer, struct, slices as
# there), with enough fields that wrong types are errors where dockerd's are.
GO_DECODER = r"""package main

import (
	"bufio"
	"bytes"
	"encoding/base64"
	"encoding/json"
	"os"
	"strings"
)

// StrSlice is moby's strslice: a string or an array of strings.
type StrSlice []string

func (s *StrSlice) UnmarshalJSON(b []byte) error {
	var list []string
	if err := json.Unmarshal(b, &list); err == nil {
		*s = list
		return nil
	}
	var one string
	if err := json.Unmarshal(b, &one); err != nil {
		return err
	}
	*s = StrSlice{one}
	return nil
}

type Config struct {
	Hostname, Domainname, User              string
	AttachStdin, AttachStdout, AttachStderr bool
	ExposedPorts                            map[string]struct{}
	Tty, OpenStdin, StdinOnce               bool
	Env                                     []string
	Cmd                                     StrSlice
	Healthcheck                             *struct {
		Test                                          []string
		Interval, Timeout, StartPeriod, StartInterval int64
		Retries                                       int
	}
	ArgsEscaped     bool
	Image           string
	Volumes         map[string]struct{}
	WorkingDir      string
	Entrypoint      StrSlice
	NetworkDisabled bool
	MacAddress      string
	OnBuild         []string
	Labels          map[string]string
	StopSignal      string
	StopTimeout     *int
	Shell           StrSlice
}

type Mount struct {
	Type, Source, Target string
	ReadOnly             bool
	Consistency          string
	BindOptions          *struct {
		Propagation                                                                  string
		NonRecursive, CreateMountpoint, ReadOnlyNonRecursive, ReadOnlyForceRecursive bool
	}
	VolumeOptions *struct {
		NoCopy       bool
		Labels       map[string]string
		Subpath      string
		DriverConfig *struct {
			Name    string
			Options map[string]string
		}
	}
	ImageOptions *struct{ Subpath string }
	TmpfsOptions *struct {
		SizeBytes int64
		Mode      uint32
		Options   [][]string
	}
	ClusterOptions *struct{}
}

type HostConfig struct {
	Binds           []string
	ContainerIDFile string
	LogConfig       struct {
		Type   string
		Config map[string]string
	}
	NetworkMode   string
	PortBindings  map[string][]struct{ HostIp, HostPort string }
	RestartPolicy struct {
		Name              string
		MaximumRetryCount int
	}
	AutoRemove      bool
	VolumeDriver    string
	VolumesFrom     []string
	CapAdd, CapDrop StrSlice
	Dns, ExtraHosts []string
	Privileged      bool
	ReadonlyRootfs  bool
	Memory          int64
	CpuShares       int64
	Mounts          []Mount
	Init            *bool
}

// CreateRequest is the body of POST /containers/create (api/types/container).
type CreateRequest struct {
	*Config
	HostConfig       *HostConfig
	NetworkingConfig *struct {
		EndpointsConfig map[string]*struct {
			Aliases              []string
			NetworkID, IPAddress string
		}
	}
}

type ContainerSpec struct {
	Image           string
	Labels          map[string]string
	Command, Args   []string
	Hostname        string
	Env             []string
	Dir, User       string
	Groups          []string
	Init            *bool
	StopSignal      string
	TTY             bool
	OpenStdin       bool
	ReadOnly        bool
	Mounts          []Mount
	StopGracePeriod *int64
	Hosts           []string
	OomScoreAdj     int64
}

type PluginSpec struct {
	Name       string `json:"name,omitempty"`
	Remote     string `json:"remote,omitempty"`
	Privileges []*struct {
		Name, Description string
		Value             []string
	} `json:"privileges,omitempty"`
	Disabled bool     `json:"disabled,omitempty"`
	Env      []string `json:"env,omitempty"`
}

type TaskSpec struct {
	ContainerSpec         *ContainerSpec
	PluginSpec            *PluginSpec
	NetworkAttachmentSpec *struct{ ContainerID string }
	RestartPolicy         *struct {
		Condition   string
		Delay       *int64
		MaxAttempts *uint64
	}
	Networks []struct {
		Target     string
		Aliases    []string
		DriverOpts map[string]string
	}
	LogDriver *struct {
		Name    string
		Options map[string]string
	}
	ForceUpdate uint64
	Runtime     string
}

type Annotations struct {
	Name   string
	Labels map[string]string
}

// ServiceSpec is the body of POST /services/create and /services/{id}/update (api/types/swarm).
type ServiceSpec struct {
	Annotations
	TaskTemplate TaskSpec
	Mode         struct {
		Replicated *struct{ Replicas *uint64 }
		Global     *struct{}
	}
	EndpointSpec *struct{ Mode string }
}

type Outcome struct {
	Images []string `json:"images,omitempty"`
	Empty  []string `json:"empty,omitempty"` // run with no Config field at all
	From   string   `json:"from,omitempty"`
	Spec   string   `json:"spec,omitempty"`
	Decode string   `json:"decode,omitempty"`
	First  *Outcome `json:"first,omitempty"` // what engines before 25 read, ignoring the rest
}

func withMounts(images []string, mounts []Mount, isImage func(string) bool) []string {
	for _, m := range mounts {
		if isImage(m.Type) {
			images = append(images, m.Source)
		}
	}
	return images
}

// run reads like runconfig's loadJSON: Decode into an interface holding the pointer, then More.
func run(body []byte) (*Outcome, bool) {
	var request CreateRequest
	var out interface{} = &request
	decoder := json.NewDecoder(bytes.NewReader(body))
	if err := decoder.Decode(&out); err != nil {
		return &Outcome{Decode: err.Error()}, false
	}
	var mounts []Mount
	if request.HostConfig != nil {
		mounts = request.HostConfig.Mounts
	}
	isImage := func(t string) bool { return t == "image" }
	if request.Config == nil { // dockerd: "config cannot be empty in order to create a container"
		return &Outcome{Empty: withMounts([]string{""}, mounts, isImage), From: "config"}, decoder.More()
	}
	return &Outcome{Images: withMounts([]string{request.Config.Image}, mounts, isImage), From: "config"}, decoder.More()
}

// service reads like httputils.ReadJSON, then chooses the runtime like convert.ServiceSpecToGRPC.
func service(body []byte) (*Outcome, bool) {
	var spec ServiceSpec
	more := false
	if len(body) > 0 { // ReadJSON: an empty body is no error
		decoder := json.NewDecoder(bytes.NewReader(body))
		if err := decoder.Decode(&spec); err != nil {
			return &Outcome{Decode: err.Error()}, false
		}
		more = decoder.More()
	}
	task := spec.TaskTemplate
	switch task.Runtime {
	case "", "container":
		if task.ContainerSpec == nil {
			return &Outcome{Spec: "mismatched Runtime and *Spec fields"}, more
		}
		isImage := func(t string) bool { return strings.ToUpper(t) == "IMAGE" } // swarm's mountToGRPC
		images := withMounts([]string{task.ContainerSpec.Image}, task.ContainerSpec.Mounts, isImage)
		return &Outcome{Images: images, From: "container"}, more
	case "plugin":
		if task.PluginSpec == nil {
			return &Outcome{Spec: "mismatched Runtime and *Spec fields"}, more
		}
		return &Outcome{Images: []string{task.PluginSpec.Remote}, From: "plugin"}, more
	}
	return &Outcome{Spec: "unsupported runtime"}, more
}

func main() {
	input := bufio.NewScanner(os.Stdin)
	input.Buffer(make([]byte, 1<<20), 1<<28)
	output := bufio.NewWriter(os.Stdout)
	defer output.Flush()
	for input.Scan() {
		kind, encoded, _ := strings.Cut(input.Text(), " ")
		body, err := base64.StdEncoding.DecodeString(encoded)
		if err != nil {
			panic(err)
		}
		decode := map[string]func([]byte) (*Outcome, bool){"run": run, "service": service}[kind]
		result, more := decode(body)
		if more { // engines 25 and later refuse what follows the first value, older ones ignore it
			result = &Outcome{Decode: "unexpected content after JSON", First: result}
		}
		line, err := json.Marshal(result)
		if err != nil {
			panic(err)
		}
		output.Write(append(line, '\n'))
	}
	if err := input.Err(); err != nil {
		panic(err)
	}
}
"""


class JSONPairs(list):
    """A JSON object to write: its (key, value) pairs in order, duplicates kept."""


class JSONText(bytes):
    """JSON text written as it is: invalid UTF-8, lone surrogates, deep nesting, no JSON at all."""


def write_json(value: Any, rng: random.Random) -> bytes:
    """The JSON text of a generated value, with randomly chosen escapes and spacing."""
    if isinstance(value, JSONText):
        return bytes(value)
    comma = rng.choice([b", ", b" ,\n"]) if rng.random() < 0.05 else b","
    if isinstance(value, JSONPairs):
        return b"{" + comma.join(write_string(key, rng) + b":" + write_json(item, rng) for key, item in value) + b"}"
    if isinstance(value, list):
        return b"[" + comma.join(write_json(item, rng) for item in value) + b"]"
    if isinstance(value, str):
        return write_string(value, rng)
    return json.dumps(value).encode()


def write_string(text: str, rng: random.Random) -> bytes:
    roll = rng.random()
    if roll < 0.05:   # every character escaped: Go matches keys after unescaping them
        utf16 = text.encode("utf-16-be", "surrogatepass")
        return b'"' + b"".join(b"\\u%02x%02x" % (utf16[i], utf16[i + 1]) for i in range(0, len(utf16), 2)) + b'"'
    # Written raw, a lone surrogate becomes invalid UTF-8: Go reads U+FFFD for each byte.
    return json.dumps(text, ensure_ascii=roll < 0.3).encode("utf-8", "surrogatepass")


# The shapes of the generated bodies: the fields dockerd's structs have (and
# a few of their neighbours), with the type of value each one takes.
IMAGE, STRING, BOOL, NUMBER, MOUNT_TYPE, RUNTIME = "image", "string", "bool", "number", "mount type", "runtime"
MOUNT = {"Type": MOUNT_TYPE, "Source": IMAGE, "Target": STRING, "ReadOnly": BOOL, "ImageOptions": {"Subpath": STRING},
         "BindOptions": {"Propagation": STRING}}
HOST_CONFIG = {"Mounts": ("list", MOUNT), "Binds": ("list", STRING), "Privileged": BOOL, "NetworkMode": STRING,
               "AutoRemove": BOOL, "Memory": NUMBER, "CapAdd": ("list", STRING)}
CREATE_REQUEST = {"Image": IMAGE, "HostConfig": HOST_CONFIG, "Hostname": STRING, "Env": ("list", STRING),
                  "Cmd": ("list", STRING), "Labels": ("map", STRING), "Tty": BOOL, "StopTimeout": NUMBER,
                  "NetworkingConfig": {"EndpointsConfig": ("map", {"Aliases": ("list", STRING)})}}
CONTAINER_SPEC = {"Image": IMAGE, "Mounts": ("list", MOUNT), "Env": ("list", STRING), "Hostname": STRING,
                  "TTY": BOOL, "Labels": ("map", STRING), "Command": ("list", STRING)}
PLUGIN_SPEC = {"remote": IMAGE, "name": STRING, "disabled": BOOL, "env": ("list", STRING)}
TASK_SPEC = {"ContainerSpec": CONTAINER_SPEC, "PluginSpec": PLUGIN_SPEC, "Runtime": RUNTIME, "ForceUpdate": NUMBER,
             "LogDriver": {"Name": STRING}}
SERVICE_SPEC = {"Name": STRING, "Labels": ("map", STRING), "TaskTemplate": TASK_SPEC,
                "Mode": {"Replicated": {"Replicas": NUMBER}}}
BODY_SHAPES = {"run": CREATE_REQUEST, "service": SERVICE_SPEC}
# The fields that decide the images: present in most generated objects.
DECISIVE_FIELDS = frozenset({"Image", "HostConfig", "Mounts", "Type", "Source", "TaskTemplate", "ContainerSpec",
                             "PluginSpec", "Runtime", "remote"})
MOUNT_TYPES = ["image"] * 6 + ["IMAGE", "Image", "bind", "volume", "tmpfs", "", "\u0131mage", "\u0130MAGE", "image ",
                              "imag\u0435", "\uff49mage", "i\u0307mage"]
RUNTIMES = ["", "", "container", "plugin", "plugin", "Container", "PLUGIN", "attachment", "x", "plugin ",
            "c\u043entainer"]
WRONG_VALUES = [0, -1, 1.5, True, False, "s", [], ["x"], JSONPairs(), JSONPairs([("Image", "wrong")])]
TRAILERS = [b" ", b"\n", b"}", b"]", b"}}", b"]x", b"{}", b"[]", b'{"Image":"trailing"}', b"x", b"\x00", b"null", b","]


def json_kind(value: Any) -> str:
    if isinstance(value, JSONPairs):
        return "object"
    if isinstance(value, list):
        return "array"
    return {bool: "bool", int: "number", float: "number", str: "string"}[type(value)]


def shape_kind(shape: Any) -> str:
    if isinstance(shape, dict) or shape[0] == "map":
        return "object"
    if isinstance(shape, tuple):
        return "array"
    return {BOOL: "bool", NUMBER: "number"}.get(shape, "string")


class BodyGenerator:
    """Request bodies shaped like dockerd's, mutated the ways Go reads differently from a Python dict."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.images = 0

    def image(self) -> Any:
        """A value never generated before, so that which one Go kept shows."""
        self.images += 1
        number, roll = self.images, self.rng.random()
        if roll < 0.02:
            return ""
        if roll < 0.03:
            return JSONText(b'"img%d\\ud800"' % number)   # a lone surrogate: Go reads U+FFFD
        if roll < 0.04:
            return JSONText(b'"img%d\xff"' % number)       # invalid UTF-8: Go reads U+FFFD
        return self.rng.choice(["img{n}", "registry.example:5000/team/app{n}:1.{n}", "app{n}@sha256:{n:064x}",
                                "Img{n}", "img{n}\u00e9", "\u0130mg{n}", "img{n}/\u017f", "img{n}\\\"/"]).format(n=number)

    def key(self, name: str) -> str:
        """The field's name, or a variant that Go matches to it, or one that it does not."""
        rng = self.rng
        roll = rng.randrange(20)
        if roll < 8:
            return name
        if roll < 12:
            return rng.choice([name.lower(), name.upper(), "".join(rng.choice([c.lower(), c.upper()]) for c in name)])
        # Go folds exactly two non-ASCII runes onto ASCII letters, the long s and the Kelvin sign, ...
        # ... and none of the others that Python's case mapping knows.
        swaps = {13: ("sS", "\u017f"), 14: ("kK", "\u212a"), 15: ("iI", rng.choice("\u0131\u0130")),
                 16: ("sS", "\u00df"), 17: ("", "")}.get(roll)
        if swaps is None:
            return rng.choice([name + " ", " " + name, name + "\u200b", name + "\x00", name[:-1], name + "s",
                               name[0] + "\u0301" + name[1:]])
        letters, replacement = swaps
        places = [i for i, c in enumerate(name) if c in letters] if letters else list(range(len(name)))
        if not places:
            return name.swapcase()
        i = rng.choice(places)
        if not letters:   # a fullwidth letter
            replacement = chr(ord(name[i]) + 0xFEE0)
        return name[:i] + replacement + name[i + 1:]

    def value(self, shape: Any, depth: int = 0) -> Any:
        rng = self.rng
        roll = rng.random()
        if roll < 0.05:
            return None
        if roll < 0.08:
            return rng.choice([value for value in WRONG_VALUES if json_kind(value) != shape_kind(shape)])
        if isinstance(shape, dict):
            return self.struct(shape, depth)
        if isinstance(shape, tuple) and shape[0] == "list":
            return [self.value(shape[1], depth + 1) for _ in range(rng.choice([0, 1, 1, 2, 2, 3, 4, 6]))]
        if isinstance(shape, tuple):
            return JSONPairs((rng.choice(["a", "b", "A", "com.x"]), self.value(shape[1], depth + 1))
                             for _ in range(rng.randint(0, 2)))
        if shape == IMAGE:
            return self.image()
        if shape == MOUNT_TYPE:
            return rng.choice(MOUNT_TYPES)
        if shape == RUNTIME:
            return rng.choice(RUNTIMES)
        if shape == BOOL:
            return rng.random() < 0.5
        if shape == NUMBER:
            return rng.choice([0, 1, 42, 2**63, 2**64, -1, 0.5, 1e3])
        return rng.choice(["", "x", "/data", "\u00e9t\u00e9", "a\\b", "\u212a"])

    def struct(self, shape: dict[str, Any], depth: int = 0) -> JSONPairs:
        rng = self.rng
        pairs = JSONPairs()
        for name, field_shape in shape.items():
            if rng.random() < (0.85 if name in DECISIVE_FIELDS else 0.15):
                for _ in range(1 if rng.random() < 0.7 else rng.randint(2, 3)):   # repeated keys at every level
                    pairs.append((self.key(name), self.value(field_shape, depth + 1)))
        if rng.random() < 0.1:   # unknown keys are ignored, whatever they hold
            pairs.append((rng.choice(["Config", "Images", "Spec", "", "x", "Image_"]),
                          rng.choice([self.image(), JSONPairs([("Image", self.image())]), [1, {}], None])))
        rng.shuffle(pairs)
        return pairs

    def mounts(self, length: int) -> list[Any]:
        """Mount entries that leave fields out, so that merging into reused elements shows."""
        rng = self.rng
        entries: list[Any] = []
        for _ in range(length):
            if rng.random() < 0.08:
                entries.append(None)   # leaves a reused element as it was
                continue
            entry = JSONPairs()
            if rng.random() < 0.7:
                entry.append((self.key("Type"), rng.choice(MOUNT_TYPES)))
            if rng.random() < 0.7:
                entry.append((self.key("Source"), self.image()))
            if rng.random() < 0.2:
                entry.append(("Target", "/m"))
            entries.append(entry)
        return entries

    # ---- bodies built to exercise one rule each -----------------------------

    def merged_task_templates(self) -> JSONPairs:
        rng = self.rng
        parts = [
            lambda: JSONPairs([(self.key("ContainerSpec"), self.struct(CONTAINER_SPEC))]),
            lambda: JSONPairs([(self.key("PluginSpec"), self.struct(PLUGIN_SPEC))]),
            lambda: JSONPairs([(self.key("Runtime"), rng.choice(RUNTIMES))]),
            lambda: JSONPairs([(self.key("ContainerSpec"), None)]),
            lambda: JSONPairs([(self.key("PluginSpec"), None)]),
            lambda: JSONPairs([(self.key("ContainerSpec"), JSONPairs([("Image", self.image())]))]),
            lambda: None,
            lambda: self.struct(TASK_SPEC),
        ]
        return JSONPairs((self.key("TaskTemplate"), rng.choice(parts)()) for _ in range(rng.randint(2, 4)))

    def repeated_host_configs(self) -> JSONPairs:
        rng = self.rng
        parts = [
            lambda: JSONPairs([(self.key("Mounts"), self.mounts(rng.randint(0, 4)))]),
            lambda: self.struct(HOST_CONFIG),
            lambda: None,
            lambda: JSONPairs(),
            lambda: JSONPairs([("Privileged", True)]),
        ]
        body = JSONPairs((self.key("HostConfig"), rng.choice(parts)()) for _ in range(rng.randint(2, 4)))
        body.insert(rng.randint(0, len(body)), (self.key("Image"), self.image()))
        return body

    def repeated_mount_arrays(self, kind: str) -> JSONPairs:
        """Mounts decoded again and again: Go reuses the elements, and capacity an earlier array left."""
        rng = self.rng
        lengths = [rng.randint(0, 7) for _ in range(rng.randint(2, 4))]
        if rng.random() < 0.5:   # long, short, long: the second long one reaches into old capacity
            lengths = [rng.randint(3, 9), rng.randint(0, 2), rng.randint(3, 9)]
        arrays = [(self.key("Mounts"), self.mounts(length)) for length in lengths]
        if kind == "run":
            if rng.random() < 0.5:
                return JSONPairs([("Image", self.image()), (self.key("HostConfig"), JSONPairs(arrays))])
            return JSONPairs([("Image", self.image())] + [(self.key("HostConfig"), JSONPairs([pair])) for pair in arrays])
        spec = lambda pairs: JSONPairs([(self.key("ContainerSpec"), JSONPairs(pairs))])
        if rng.random() < 0.5:
            return JSONPairs([("TaskTemplate", spec([("Image", self.image())] + arrays))])
        return JSONPairs([("TaskTemplate", spec([("Image", self.image())]))]
                         + [(self.key("TaskTemplate"), spec([pair])) for pair in arrays])

    def runtimes(self) -> JSONPairs:
        rng = self.rng
        task = JSONPairs([(self.key("Runtime"), rng.choice(RUNTIMES)) for _ in range(rng.randint(1, 2))])
        if rng.random() < 0.8:
            task.append((self.key("ContainerSpec"), self.struct(CONTAINER_SPEC)))
        if rng.random() < 0.8:
            task.append((self.key("PluginSpec"), self.struct(PLUGIN_SPEC)))
        rng.shuffle(task)
        return JSONPairs([(self.key("TaskTemplate"), task)])

    def deeply_nested(self, kind: str) -> JSONText:
        depth = self.rng.choice([100, 999, 1001, 3000, 9998, 10001])
        nested = b"[" * depth + b"]" * depth if self.rng.random() < 0.5 else b'{"a":' * depth + b"1" + b"}" * depth
        inner = b'"Image":%s,"Deep":%s' % (write_json(self.image(), self.rng), nested)
        return JSONText(b"{%s}" % inner if kind == "run" else b'{"TaskTemplate":{"ContainerSpec":{%s}}}' % inner)

    def body(self, kind: str) -> bytes:
        rng = self.rng
        roll = rng.random()
        if roll < 0.04:
            document: Any = self.merged_task_templates() if kind == "service" else self.repeated_host_configs()
        elif roll < 0.12:
            document = self.repeated_mount_arrays(kind)
        elif roll < 0.15:
            document = self.runtimes() if kind == "service" else self.repeated_host_configs()
        elif roll < 0.16:
            document = JSONText(rng.choice([b"", b" ", b"null", b"[]", b"[{}]", b'"x"', b"1", b"{}", b"true",
                                            b"\xef\xbb\xbf{}", b"{} ", b"{}}"]))
        elif roll < 0.17:
            document = self.deeply_nested(kind)
        else:
            document = self.struct(BODY_SHAPES[kind])
        text = write_json(document, rng)
        roll = rng.random()
        if roll < 0.04:
            text += rng.choice(TRAILERS)
        elif roll < 0.14:
            text = self.mutate(text)
        return text

    def mutate(self, text: bytes) -> bytes:
        """Byte-level damage to JSON text."""
        rng = self.rng
        mutated = bytearray(text)
        for _ in range(rng.randint(1, 3)):
            where = rng.randrange(len(mutated) + 1)
            operation = rng.randrange(5)
            if operation == 0 and where < len(mutated):
                del mutated[where]
            elif operation == 1:
                mutated[where:where] = rng.choice([b"{", b"}", b"[", b"]", b",", b":", b'"', b"\\", b" ", b"0",
                                                   b"null", b"\xff", b"\x00", b"\xc5\xbf", b"e"])
            elif operation == 2 and where < len(mutated):
                mutated[where] = rng.randrange(256)
            elif operation == 3:
                end = min(len(mutated), where + rng.randint(1, 30))
                mutated[where:where] = mutated[where:end]
            elif operation == 4:
                del mutated[where:]
        return bytes(mutated)


def go_decoder(directory: str) -> str:
    return go_program(directory, GO_DECODER, "the differential test against encoding/json")


def go_program(directory: str, source: str, purpose: str) -> str:
    """Build a Go program with the machine's Go, offline, in a temporary directory."""
    go = shutil.which("go")
    if go is None:
        message = f"Go is not installed (apt-get install golang-go): {purpose}"
        if REQUIRE_E2E:
            raise AssertionError(message + " is required")
        raise unittest.SkipTest(message + " cannot run")
    Path(directory, "main.go").write_text(source)
    env = dict(os.environ, GOCACHE=f"{directory}/cache", GOPATH=f"{directory}/gopath", GO111MODULE="off",
               GOTOOLCHAIN="local", GOFLAGS="", GOENV="off", CGO_ENABLED="0")
    build = subprocess.run([go, "build", "-o", "decoder", "main.go"], cwd=directory, env=env,
                           capture_output=True, text=True, timeout=300)
    if build.returncode:
        raise AssertionError(f"go build failed: {build.stderr}")
    return str(Path(directory, "decoder"))


def judge(kind: str, body: bytes, answer: dict[str, Any], images: Any) -> str | None:
    """The outcome class of Python's answer given Go's, or None for a mismatch."""
    unreadable = isinstance(images, dip.Unreadable)
    if unreadable and "nested too deeply" in str(images):
        # Go reads 10,000 levels, Python's parser about 1,000; no client nests that deep: refused.
        return "nested too deeply, refused" if body.count(b"[") + body.count(b"{") > 900 else None
    if "images" in answer:
        # Each image mounted is judged once: a source mounted twice is one image to judge.
        if images == (answer["images"][0], *dict.fromkeys(answer["images"][1:])):
            source = kind if kind == "run" else f"service {answer['from']}"
            return f"{source}: images" + (" with image mounts" if len(images) > 1 else "")
        return "ambiguous" if unreadable and "ambiguous" in str(images) else None
    if "empty" in answer:   # dockerd refuses it; the image is "" either way
        empty = (answer["empty"][0], *dict.fromkeys(answer["empty"][1:]))
        return "run: empty config" if unreadable or images == empty else None
    if "spec" in answer:
        return f"{kind}: spec error" if unreadable else None
    first = answer.get("first", {})
    if "images" in first or "empty" in first:   # older engines read the first value and ignore the rest
        listed = first.get("images", first.get("empty"))
        expected = (listed[0], *dict.fromkeys(listed[1:]))
        return "trailing data" if unreadable or images == expected else None
    if unreadable:
        return f"{kind}: decode error, refused"
    if isinstance(images, tuple) and all(isinstance(image, str) for image in images):
        return f"{kind}: decode error, read anyway"
    return None


GO_CONFIG_DECODER = r"""package main

import (
	"bufio"
	"bytes"
	"encoding/base64"
	"encoding/json"
	"os"
)

type policyTest struct {
	Image     string `json:"image"`
	Operation string `json:"operation"`
	Target    string `json:"target"`
	Expect    string `json:"expect"`
	Note      string `json:"note"`
}

// The Go plugin's Config, with this plugin's keys beside its three.
type config struct {
	Whitelist         []string     `json:"whitelist"`
	Blacklist         []string     `json:"blacklist"`
	DefaultAllow      bool         `json:"defaultAllow"`
	Mode              string       `json:"mode"`
	CheckRun          bool         `json:"checkRun"`
	AllowBuild        *bool        `json:"allowBuild"`
	AllowCommit       *bool        `json:"allowCommit"`
	AllowImport       *bool        `json:"allowImport"`
	AllowLoad         *bool        `json:"allowLoad"`
	AllowPluginCreate *bool        `json:"allowPluginCreate"`
	AllowSwarm        *bool        `json:"allowSwarm"`
	Message           string       `json:"message"`
	Tests             []policyTest `json:"tests"`
}

func main() {
	in := bufio.NewScanner(os.Stdin)
	in.Buffer(make([]byte, 1<<20), 1<<24)
	out := json.NewEncoder(os.Stdout)
	for in.Scan() {
		file, _ := base64.StdEncoding.DecodeString(in.Text())
		cfg := config{Mode: "enforce", CheckRun: true}
		if err := json.NewDecoder(bytes.NewReader(file)).Decode(&cfg); err != nil {
			out.Encode(map[string]string{"error": err.Error()})
			continue
		}
		out.Encode(map[string]config{"config": cfg})
	}
}
"""


class ConfigGenerator:
    """Policy files in the Go plugin's format and this plugin's, spelt as Go's decoder accepts them."""

    KEYS = ("whitelist", "blacklist", "defaultAllow", "mode", "checkRun", "allowBuild", "allowLoad", "message", "tests")
    TEST_KEYS = ("image", "operation", "expect", "note")

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)

    def spelling(self, key: str) -> str:
        rng = self.rng
        if rng.random() < 0.5:
            return key
        spelt = "".join(c.swapcase() if rng.random() < 0.4 else c for c in key)
        spelt = spelt.replace("s", "\u017f") if rng.random() < 0.2 else spelt   # ſ folds to S
        return spelt.replace("k", "\u212a") if rng.random() < 0.3 else spelt    # the Kelvin sign folds to K

    def value(self, key: str) -> Any:
        rng = self.rng
        roll = rng.random()
        if roll < 0.1:
            return None
        if roll < 0.15:
            return rng.choice([1, "yes", [], {}, [1], True, 0.5])
        if key in ("whitelist", "blacklist"):
            return [None if rng.random() < 0.1 else rng.choice(["^nginx:", "^a", "b$", "^quay\\.io/", "x"])
                    for _ in range(rng.randint(0, 3))]
        if key in ("defaultAllow", "checkRun", "allowBuild", "allowLoad"):
            return rng.random() < 0.5
        if key == "mode":
            return rng.choice(["enforce", "audit"])
        if key == "message":
            return rng.choice(["", "See the wiki.", "\u00e9t\u00e9"])
        return [self.test() for _ in range(rng.randint(0, 3))]

    def test(self) -> Any:
        rng = self.rng
        pairs = [("image", rng.choice(["nginx:1", "redis:7"])), ("expect", rng.choice(["allow", "deny"]))]
        if rng.random() < 0.3:
            pairs.append(("operation", rng.choice(["pull", "run"])))
        if rng.random() < 0.3:
            pairs.append(("note", "why"))
        if rng.random() < 0.2:
            pairs.append((rng.choice(self.TEST_KEYS), rng.choice([None, "nginx:2", "deny", 5])))
        rng.shuffle(pairs)
        return JSONPairs((self.spelling(key), value) for key, value in pairs)

    def file(self) -> bytes:
        rng = self.rng
        keys = rng.sample(self.KEYS, rng.randint(0, len(self.KEYS)))
        keys += [rng.choice(self.KEYS) for _ in range(rng.randint(0, 2))]   # duplicates
        if rng.random() < 0.05:
            keys.append(rng.choice(["_comment", "whitelists", "Blacklist "]))
        data = write_json(JSONPairs((self.spelling(key), self.value(key if key in self.KEYS else "message"))
                                    for key in keys), rng)
        if rng.random() < 0.15:
            data += rng.choice([b"\n", b" {}", b"\ngarbage", b', "x": 1}', b"]"])
        return data


def python_settings(policy: dip.Policy) -> dict[str, Any]:
    """What compile_policy made of a file, in the Go program's terms."""
    raw = {operation.key: None if "is not set" in verdict.reason else verdict.allow
           for operation, verdict in policy.operations.items()}
    return {"whitelist": [rule.pattern for rule in policy.whitelist.rules],
            "blacklist": [rule.pattern for rule in policy.blacklist.rules],
            "defaultAllow": policy.default_allow, "mode": policy.mode, "checkRun": policy.check_run,
            **raw, "message": policy.message,
            "tests": [{"image": test.image, "operation": test.operation.command, "target": test.target,
                       "expect": "allow" if test.allow else "deny", "note": test.note} for test in policy.tests]}


def go_settings(config: dict[str, Any]) -> dict[str, Any]:
    config = {key: value for key, value in config.items()}
    for key in ("whitelist", "blacklist", "tests"):
        config[key] = config[key] or []
    for test in config["tests"]:
        test["operation"] = test["operation"] or "pull"
    return config


# The deliberate differences: what this plugin refuses in a file Go reads.
CONFIG_REFUSALS = ("unknown key", "is missing", 'must be "allow" or "deny"', 'must be "enforce" or "audit"', "ambiguous",
                   "invalid regular expression", '"operation" must be one of')


class TestGoConfigDecoding(unittest.TestCase):
    """compile_policy against Go's encoding/json decoding the same files into the Go plugin's Config."""

    count = 3_000 * (10 if LONG else 1)

    def test_files_mean_what_go_reads(self):
        directory = tempfile.mkdtemp(prefix="dip-go-")
        self.addCleanup(shutil.rmtree, directory, ignore_errors=True)
        decoder = go_program(directory, GO_CONFIG_DECODER, "the differential test of policy files against encoding/json")
        generator = ConfigGenerator(seed=20261)
        files = [generator.file() for _ in range(self.count)]
        result = subprocess.run([decoder], input="".join(base64.b64encode(file).decode() + "\n" for file in files),
                                capture_output=True, text=True, timeout=300)
        self.assertEqual(result.returncode, 0, result.stderr)
        answers = [json.loads(line) for line in result.stdout.splitlines()]
        self.assertEqual(len(answers), len(files))
        counts: dict[str, int] = {}
        mismatches = []
        for file, answer in zip(files, answers):
            try:
                policy = dip.compile_policy(file.decode("utf-8", "docker-image-policy-go"), "p.json")
            except dip.ConfigError as error:
                if "error" in answer:
                    outcome = "refused by both"
                elif any(refusal in str(error) for refusal in CONFIG_REFUSALS):
                    outcome = "refused here only: " + next(r for r in CONFIG_REFUSALS if r in str(error))
                else:
                    outcome = None
                    mismatches.append(f"{file!r}\n    Go: {answer}\n    Python: {error}")
            else:
                outcome = "read alike" if "config" in answer and go_settings(answer["config"]) == \
                    python_settings(policy) else None
                if outcome is None:
                    mismatches.append(f"{file!r}\n    Go: {answer}\n    Python: {python_settings(policy)}")
            if outcome:
                counts[outcome] = counts.get(outcome, 0) + 1
        summary = ", ".join(f"{key}: {value}" for key, value in sorted(counts.items()))
        if mismatches:
            self.fail(f"{len(mismatches)} of {len(files)} files read unlike Go ({summary}):\n" + "\n".join(mismatches[:5]))
        self.assertGreater(counts.get("read alike", 0), len(files) // 4, summary)
        self.assertGreater(counts.get("refused by both", 0), len(files) // 20, summary)


class TestGoDecoding(unittest.TestCase):
    """images_in_body against Go's encoding/json decoding the same bodies into dockerd's structs."""

    count = 12_000 * (10 if LONG else 1)

    def test_images_are_the_ones_go_decodes(self):
        directory = tempfile.mkdtemp(prefix="dip-go-")
        self.addCleanup(shutil.rmtree, directory, ignore_errors=True)
        decoder = go_decoder(directory)
        self.assertTrue(hasattr(dip, "images_in_body"), "docker_image_policy.images_in_body is missing")
        generator = BodyGenerator(seed=20260)
        bodies = [(kind, generator.body(kind)) for kind in ("run", "service") * (self.count // 2)]
        lines = "".join(f"{kind} {base64.b64encode(body).decode()}\n" for kind, body in bodies)
        result = subprocess.run([decoder], input=lines, capture_output=True, text=True, timeout=300)
        self.assertEqual(result.returncode, 0, result.stderr)
        answers = [json.loads(line) for line in result.stdout.splitlines()]
        self.assertEqual(len(answers), len(bodies))
        counts: dict[str, int] = {}
        mismatches = []
        for (kind, body), answer in zip(bodies, answers):
            try:
                images: Any = dip.images_in_body(kind, body)
            except dip.Unreadable as error:
                images = error
            except Exception as error:   # anything else is a bug, whatever Go says
                images = error
            outcome = judge(kind, body, answer, images)
            if outcome is None:
                mismatches.append(f"{kind} body {body[:600]!r}{' (%d bytes)' % len(body) if len(body) > 600 else ''}\n"
                                  f"    Go:     {json.dumps(answer, ensure_ascii=False)}\n    Python: {images!r}")
            else:
                counts[outcome] = counts.get(outcome, 0) + 1
        summary = ", ".join(f"{name}: {number}" for name, number in sorted(counts.items()))
        if mismatches:
            self.fail(f"{len(mismatches)} of {len(bodies)} bodies read unlike Go ({summary}):\n"
                      + "\n".join(mismatches[:25]))
        for outcome in ("run: images", "run: images with image mounts", "run: empty config",
                        "service container: images", "service container: images with image mounts",
                        "service plugin: images", "service: spec error", "run: decode error",
                        "service: decode error", "trailing data"):
            self.assertGreater(sum(number for name, number in counts.items() if name.startswith(outcome)), 20,
                               f"{outcome!r} never happened: {summary}")
        exact = sum(number for name, number in counts.items() if ": images" in name)
        self.assertLess(counts.get("ambiguous", 0), exact / 20, summary)



# --------------------------------------------------------------------------
# Docker API
# --------------------------------------------------------------------------

class StandInDockerHandler(dip.BaseHTTPRequestHandler):
    """A stand-in for dockerd's API: GET answered with answer()'s status and JSON document."""

    def answer(self) -> tuple[int, Any]:
        raise NotImplementedError

    def do_GET(self) -> None:
        status, document = self.answer()
        body = json.dumps(document).encode()
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def address_string(self) -> str:
        return "docker"

    def log_message(self, *args: Any) -> None:
        pass


NGINX_ID, SMUGGLED_ID, NAMELESS_ID = ("sha256:" + digit * 64 for digit in "123")
NO_RULE = "no whitelist rule matches and defaultAllow is false"
# A host as GET /images/json, /containers/json and /services describe it.
SCANNED_HOST = {
    "/images/json?all=1": (200, [
        {"Id": NGINX_ID, "RepoTags": ["nginx:1.25"], "RepoDigests": ["nginx@" + DIGEST]},
        {"Id": SMUGGLED_ID, "RepoTags": ["smuggled:1", "nginx:smuggled"], "RepoDigests": []},
        {"Id": NAMELESS_ID, "RepoTags": ["<none>:<none>"], "RepoDigests": None}]),
    "/containers/json?all=1": (200, [
        {"Id": "c1" * 32, "Names": ["/web"], "Image": "nginx:1.25", "ImageID": NGINX_ID},
        {"Id": "c2" * 32, "Names": ["/old"], "Image": "smuggled:1", "ImageID": SMUGGLED_ID},
        {"Id": "c3" * 32, "Names": ["/by-id"], "Image": SMUGGLED_ID, "ImageID": SMUGGLED_ID},
        {"Id": "c4" * 32, "Names": ["/nameless"], "Image": "333333333333", "ImageID": NAMELESS_ID}]),
    "/services": (200, [
        {"ID": "s1", "Spec": {"Name": "api", "TaskTemplate": {"ContainerSpec": {"Image": "nginx:1.25@" + DIGEST}}}},
        {"ID": "s2", "Spec": {"Name": "miner", "TaskTemplate": {"ContainerSpec": {"Image": "evil/miner:1"}}}},
        {"ID": "s3", "Spec": {"Name": "plugin", "TaskTemplate": {"Runtime": "plugin",
                                                                 "PluginSpec": {"Remote": "evil/plugin:1"}}}}]),
}


class TestDockerAPI(unittest.TestCase):
    """Image inspection against a small stand-in for dockerd's API."""

    answers = {
        "/images/aaaa/json": (200, {"Id": "sha256:aaaa1", "RepoTags": ["nginx:1"], "RepoDigests": ["nginx@" + DIGEST]}),
        "/images/bbbb/json": (200, {"Id": "sha256:bbbb1", "RepoTags": None, "RepoDigests": []}),
        "/images/cccc/json": (200, {"Id": "sha256:cccc1", "RepoTags": ["<none>:<none>"],
                                    "RepoDigests": ["<none>@<none>"]}),
        "/images/dddd/json": (500, {"message": "boom"}),
        "/images/eeee/json": (200, {"Id": "sha256:eeee1", "RepoTags": [7]}),
        "/images/json?all=1": (200, [{"Id": "sha256:aaaa1", "RepoTags": ["nginx:1"], "RepoDigests": []},
                                     {"Id": "sha256:aaaa2", "RepoTags": ["redis:7"], "RepoDigests": None},
                                     {"Id": "sha256:bbbb1", "RepoTags": [], "RepoDigests": []}]),
        "/services/web?insertDefaults=false": (200, {"ID": "w1", "PreviousSpec": {"Name": "web"}}),
        "/services/odd?insertDefaults=false": (200, ["not", "a", "service"]),
    }

    def setUp(self):
        self.docker = self.stand_in(self.answers)
        self.path = self.docker.host[len("unix://"):]

    def stand_in(self, answers: dict[str, tuple[int, Any]]) -> dip.DockerAPI:
        """A stand-in daemon serving answers, and the DockerAPI that reads it."""

        class DockerAPIHandler(StandInDockerHandler):
            def answer(self) -> tuple[int, Any]:
                return answers.get(self.path, (404, {"message": "No such image"}))

        directory = tempfile.mkdtemp(prefix="dip")
        self.addCleanup(shutil.rmtree, directory)
        path = os.path.join(directory, "docker.sock")
        server = socketserver.ThreadingUnixStreamServer(path, DockerAPIHandler)
        thread = threading.Thread(target=server.serve_forever, args=(0.05,))
        thread.start()
        self.addCleanup(thread.join)
        self.addCleanup(server.server_close)
        self.addCleanup(server.shutdown)
        return dip.DockerAPI(f"unix://{path}")

    def test_images_for(self):
        image = dip.LocalImage
        self.assertEqual(self.docker.images_for("aaaa"), [image("sha256:aaaa1", ("nginx:1", "nginx@" + DIGEST)),
                                                          image("sha256:aaaa2", ("redis:7",))])
        self.assertEqual(self.docker.images_for("bbbb"), [image("sha256:bbbb1", ())])
        self.assertEqual(self.docker.images_for("cccc"), [image("sha256:cccc1", ())])
        self.assertEqual(self.docker.images_for("ffff"), [])
        for text, message in [("dddd", "status 500"), ("eeee", "names that are not strings")]:
            with self.subTest(text), self.assertRaises(dip.ImagePolicyError) as caught:
                self.docker.images_for(text)
            self.assertIn(message, str(caught.exception))
        with self.assertRaises(dip.ImagePolicyError) as caught:
            dip.DockerAPI(f"unix://{self.path}.missing").images_for("aaaa")
        self.assertIn("No such file or directory", str(caught.exception))
        with self.assertRaises(dip.ImagePolicyError):
            dip.DockerAPI("ssh://host").images_for("aaaa")

    def test_lists_of_images_containers_and_services(self):
        docker = self.stand_in(SCANNED_HOST)
        self.assertEqual(docker.images()[1], dip.LocalImage(SMUGGLED_ID, ("smuggled:1", "nginx:smuggled")))
        self.assertEqual(docker.images()[2], dip.LocalImage(NAMELESS_ID, ()))
        self.assertEqual(docker.containers()[2], dip.LocalContainer("c3" * 32, "by-id", SMUGGLED_ID, SMUGGLED_ID))
        self.assertEqual([(service.id, service.name) for service in docker.services()],
                         [("s1", "api"), ("s2", "miner"), ("s3", "plugin")])
        not_a_manager = self.stand_in({"/services": (503, {"message": "This node is not a swarm manager."})})
        self.assertIsNone(not_a_manager.services())
        odd = self.stand_in({"/images/json?all=1": (200, [{"RepoTags": []}]), "/containers/json?all=1": (200, [7]),
                             "/services": (200, [{"ID": "x"}])})
        for listing, message in [(odd.images, "unexpected image list"), (odd.containers, "unexpected container list"),
                                 (odd.services, "unexpected service list")]:
            with self.subTest(message), self.assertRaises(dip.ImagePolicyError) as caught:
                listing()
            self.assertIn(message, str(caught.exception))

    def test_scan_judges_images_containers_and_services_as_requests(self):
        scan = dip.scan_host(policy_of(ORIGINAL_CONFIG), self.stand_in(SCANNED_HOST))
        self.assertEqual((scan.images, scan.containers, scan.services, len(scan.findings)), (3, 4, 3, 12))
        nameless = f"image {NAMELESS_ID[:19]} has no repository name or digest the policy could allow"
        self.assertEqual([(finding.kind, finding.name, finding.decision.message(None), finding.decision.rule)
                          for finding in scan.refused], [
            ("image", "smuggled:1", f"pull of smuggled:1 denied: {NO_RULE}", "defaultAllow"),
            ("image", "<none>", f"run of {NAMELESS_ID} denied: {nameless}", "image-id"),
            ("container", "old", f"run of smuggled:1 denied: {NO_RULE}", "defaultAllow"),
            ("container", "nameless", f"run of 333333333333 denied: {nameless}", "image-id"),
            ("service", "miner", f"service of evil/miner:1 denied: {NO_RULE}", "defaultAllow"),
            ("service", "plugin", f"service of evil/plugin:1 denied: {NO_RULE}", "defaultAllow"),
        ])
        # Run by ID, the smuggled image is allowed: one of its names (nginx:smuggled) is.
        by_id = [finding for finding in scan.findings if finding.name == "by-id"][0]
        self.assertEqual(by_id.decision.reason, 'whitelist rule "^nginx:" matches for its name nginx:smuggled')
        unchecked = dip.scan_host(policy_of(dict(ORIGINAL_CONFIG, checkRun=False)), self.stand_in(SCANNED_HOST))
        self.assertEqual([(finding.kind, finding.name) for finding in unchecked.refused],
                         [("image", "smuggled:1"), ("service", "miner"), ("service", "plugin")])

    def test_scan_names_what_only_an_exception_allows(self):
        policy = policy_of({"scopes": [{"allow": "docker.io/library/nginx"},
                                       {"allow": "docker.io/library/smuggled", "until": "2999-01-31", "ticket": "T-1"},
                                       {"allow": "docker.io/evil", "tags": ["1"]}]})
        scan = dip.scan_host(policy, self.stand_in(SCANNED_HOST))
        excepted = [(finding.kind, finding.name, entry.index) for finding, entry in scan.excepted(policy)]
        self.assertEqual(excepted, [("image", "smuggled:1", 1), ("container", "old", 1), ("container", "by-id", 1)])
        ended = dataclasses.replace(policy, at=dip.parse_time("3000-01-01"))
        self.assertEqual(dip.scan_host(ended, self.stand_in(SCANNED_HOST)).excepted(ended), [])

    def test_host_images_resolve_like_the_daemon(self):
        host = dip.HostImages(self.stand_in(SCANNED_HOST).images())
        ids = lambda text: [image.id for image in host.images_for(text)]
        self.assertEqual(ids("smuggled:1"), [SMUGGLED_ID])
        self.assertEqual(ids("docker.io/library/nginx:smuggled"), [SMUGGLED_ID])
        self.assertEqual(ids("2222"), [SMUGGLED_ID])
        self.assertEqual(ids(NAMELESS_ID), [NAMELESS_ID])
        self.assertEqual(ids("3" * 64), [NAMELESS_ID])
        self.assertEqual(ids("4444"), [])
        self.assertEqual(ids("redis:7"), [])

    def test_service(self):
        self.assertEqual(self.docker.service("web")["PreviousSpec"], {"Name": "web"})
        for name, message in [("gone", "no such service 'gone'"), ("odd", "unexpected service answer")]:
            with self.subTest(name), self.assertRaises(dip.ImagePolicyError) as caught:
                self.docker.service(name)
            self.assertIn(message, str(caught.exception))


# --------------------------------------------------------------------------
# Signatures: ECDSA P-256
# --------------------------------------------------------------------------

# Every test vector of Wycheproof's ecdsa_secp256r1_sha256_test.json (C2SP/wycheproof,
# testvectors_v1, commit dac1dd4729fd1f8dd9e1e9f3dce51d783da6c166; Apache-2.0), as
# zlib-compressed JSON of [publicKeyDer, [[tcId, msg, sig, result == "valid"], ...]] per group.
WYCHEPROOF_P256_SHA256 = (
    "eNrsncl6I0eWpd9Fay1sHp5FXy1sXPWquvr9+z8OMAJkgAxl0ZFC1QeXlCkxQPh18zucY3aHv/76w5tYvbHeJJNdKymUsfw0zlh+"
    "Um5+wodMNj44Y0wwobU1sk8+Zpe2s3730upKYTbfS/JuBRtqbDWEyedjj86t3rILZrcZS57V25hraa35FnszNueYSx5rmrha27mH"
    "Zeoexc40bWsxpFV8ijO6OP/486+/7J9//PEn8odonLPGdFddS7Z6X3daMeXGs40a7TBz9DGCmzatkJG27rpqWTlxh1lyNt2HxrcY"
    "SbGSCdWN2IoLbue0Te57+ZRsnyvWNVyziBn7dLN11/rqc5faklvujz//6z//3/qPP/9yf/4RJuuTf4poojd9pm5GbdvNVHsrNe/U"
    "4+6xphrH7tv7tldKs7c5duxlusZDRV+W85fHnCWuUOroudlk94xxzTVZtr7DGGaYWvLyy2+zkX+0VX0YmX9pfge/6g8RPZJZ77z3"
    "wfN2L4Kmy01aWc1GM3oxluXOvtgRht128id1Lpet3bXajJIEk1r2M1ce09YVrS/l8i3bt153S6XPkGv2fKy7ifIUM1xvfL9zo05e"
    "w3A2O1SpFFe9KzGEihb9EDX8+Yf5m9c7laglrYR++7XdmmGt2NpsFgWJrmdeSEXREktlWrXb1ZF4pBKqmTHvnq3emp+8kYl6T5Sr"
    "1Okzb6KMvi1vofeODmxWnQeYaNpm2bNBXVtuqYZex/Uh/oPH+G8aG3qduzXRsma82YlmrJByccW6gqK4arxLvI3KrUsyqY4ywtwJ"
    "A3XFl5Gxq5oCVjWMQYWd3R3rLC2ZzRtPOaXuZ00lYgAxFsyt5rCyD5a3uWRs8Z6yBK0PQvlW+kq9hhnXKKalWae11bTg09p7RSlt"
    "s2utEnmvY6S2a59xuGWlKiaMmUwvMc6AycXuBw9sV08DH9BWxuT34nVs9ImV5YFayjvjb3Am6M8PRUkPFbN7Vzea3Byv3bQ4fEGn"
    "WEnf7Y62pFYyyjXaiHMHgzOzPvRQbUwl5Nn/+HO3//N/JWe+J2c8SU75wm9Lel3QckfQYp9L1LdFrfdkdcY8p7TWfOZ/n09U+0iz"
    "OldUd08JIu70uJ5UFe6F4lLfhH67nlT4cE94YNblekqR412Ry9tCP6PI6a7I+5lXOd81xb2fWui7Aa/sD9dTin4v/j2nqO5e7CtP"
    "aXju19h384f3os3NH9+lWPl5HvNCmH6IG+6L+6Qu0cUnB9EfVjc9uzLEd+LepSgN1mhz9k+KRdw97x2q48meVuR6Vy2eTpPDXG32"
    "tfZP0f1dBjNb44b8ypjPu+r+LqOZzrlyK/5Tiu7uin6GqDx+/fD454p+l+fYmw/cjUAdmVxrvT+tNt3lE+aZo5FP90W2TyzyrxHp"
    "fcjyv3p/t55UY371+m4/p6jhjpd/0g3AcMeruycV9Vcvvp9VAe557Vu7C3e9duVD1jhtFD7hM8Wn3tG8EfT+icYTrujd3R7u8Uxb"
    "2uZ1va7X9bpe1+t6Xa/rdb2u1/W6Xtfrel2v63W9rtf1ul7X63pdr+t1va7X9bpe1+t6Xf8LrpuEhfLkNQgfxK1PL+5PYeOz13co"
    "cfD9+kb77CInU6xVj4J3Yrv/AVq8F8K8Sx2P/vnF/ihy+CRR3zxlmniMT15u8j6HMN7NcytPpBBq0nArcH5ygfvO+53A92tjnkfg"
    "hh29T+iO9cl1uL3T4WT+B5Ty3Ih7L+JJzu+LenOTe/EpPZVdn7yqd2s+/Tcftp4uZjhTzPIwHY1niTkfakrpDDHLwy0+f9JypNgn"
    "dE/lE+evli5PKG79rBrZPpuo2Xwiqt1PJ+rdOs2GEvxo6fJ8qpDvVmjCgX5t6fKEwvtPYOLPli5PJ3L4VOS3li5PJ3L8VOT9rKuc"
    "PjXFn31Rnk7o/Emx9K8tXZ5O9PKJl35CUT+LfeXpDK/ci31vrTVPvM1dbhXk70++kfvseU5Y+pvbfNrJxn37NpcNtHNXJXwq7jNG"
    "g/LAvbpHrG56nDLEB4h7v5MNwsZLN5tn3Jwpn3SycS64+Jw7zqV+1lPFnaTJP3rQnN459G5UUACzp9/qLqPpLFJ6a3PylL1V3Sf6"
    "eNKhzQPcVPWfi+yfVORwXw8f4BXrJ93TnpCS1nRf1CfctKqfNHb2TyjqJ/ziCXtL1Pv8AiL0hF2dPwsl55uwNfZTkKDjSte1pfds"
    "6+M+79pYn01W/6AOk/UBsoZPOtp8d1P3fEnjp5I+2/tPn/W0KTqGQJftKSjidb2u1/W6Xtfrel2v63W9rtf1ul7X63pdr+t1va7X"
    "9bpe1+t6Xa/rdb2u1/W6Xtfrel3/06/TsxY+q/J09vlKR6y5l4bmkqnGlgesTb1/t6O5w+l3s3cLLc8pzviunO1WTvt8cpZ76+me"
    "S0732Xv3zyNn/Uo/w2ee4oS8ymLPtqZHdrQ5ispPljc9cj61O1fW/EhZzbmylk8KUU/Rg5915SdrQ/2kKPwUqX8tLD9Xemce2Dzo"
    "Z2X5uTLbh8r8M3XzTJndQ2XeD1ln/1B7/Fmhfa7U4WFjtO9Vl58re3ygtz5b1kdGwXKy9eVH9hvzZ7cEta48WN6zvVt99vV9137O"
    "evMwz6Z6zx/Vx+fGav+4uKeaafeAYkSkfZg3du6s9g7mpgL5Vnb/Sa+Hc1jU7Z3uxqx+0irlm/rjk99ufKBGnrVL9MG3+vRYmf0j"
    "ZM6P08QPnrE8LqqfzV18fZysZ+9xBPM4Wf3ZstrHyRrOltU9TNa9z5b1kfHknRWH8FCk8GNX/dTVeST3UUnnmbKmx8r6zXWN72TN"
    "n1TlPscO4K2k5Yuq3HP2gq05Y3/1dbT5ul7X63pdr+t1va7X9bpe1+t6Xa/rdb2u1/W6Xtfrel2v63W9rtf1ul7X63pdr+t1/W+4"
    "brMW6gNr7dzZWfvxsykGJ0h7VPbe3ss+7l4fhrbb6D6tjTZvvdzn9W7z4936GMMUfrOaVNJcbZTkYx+99h19On1Gs43+95Xc+ypt"
    "/yDtDm4v62bebeZQZxjRumZ8GmZXU8b5eefxi6Fr9jp0LV/fZfr4Lh1/MHfvjtUsM80ws6vZzZ2cKTbvB1Sex88zyWaII+Zga0jd"
    "NevzjtUlt1bavO+KHLZtl1tc1trcUsje12hScM1Pux4ga/pcb9+kNVdpwwdpDTe3a7piois9ue7bmnGP6rdJO/sH6O0XHQjWVVp3"
    "ldZ9XNvAb+08Rk+75uowgsxNgw8pmDbqA/S2/N4nPE+/hPhpHekvNaDPN+jQJvPFWl/vU673SR/v43JaZoWGRqAyeIk9Jt84rEVZ"
    "phvnS/t5hvP1Lu16l/DxLm02wtzaJoYUY/GF1S2mJFY+Olfa+bK6L73vcSd/vZP9cCd0g5vZge0Nv0cue/g4tdYxlzJxyOfXhKSv"
    "YlsYM5leUpyBMBabH7lbu3oaaHpbuSLXGgRf33gVOxe/Rg89rVZzLwd2OFna8IVHu0qbr9LWj9LOUu22PYIXMD/imvFu8TbWAkq4"
    "Gc6XNv7eyv77Wa2nS5t+Z2VPJGv+F7zv80l/L9KZH91vPmDlVH/36dvatGx+8+l9WzOX7W/78PysnL5cHyuq+wAxNPxstrmuErbv"
    "WgS38QsOf3Z7N/fou92uW/aPvpu7vVv4V+9mP2Or+5Pr9m7xrLvZv8GZ746cv+qU/UVf7856f/fpdzpRfvPp98/9Rd8oe7q+3h9S"
    "fubdbtet2Eff7VZfi/tX7/YdfS3+rLv9HX29O3b8olN8/0d9vTv1+92n3+lE+s2n3z93/vS59z5fX8uj7/Zu3eqj73arr9X8q3f7"
    "jr5We9bd/o6+1s9s8Qz9+EXfq3/03W51soYH3+39e/sCcZ9wt5PttaZnl/ad3uRnl/advyj/bmm/5W/qs0j7N/yVM+ZxNv0L/3HG"
    "Pvpu9vZu7sF3u33vzvjHvffT+Zsz4dmlfac38dmldbfSpn+3tN/wV87kZ5H2b/mr8jibdr/6q/rou93apDUPvtu7936/Q/FpdzvZ"
    "X1n37NLe6o31zy7trb+y4d8t7Xf8lY3PIu3f8Vd3OxZ/YtP/8qr84q9sfvTd3tlkefDd3r/3fwFX/zfudrK/cubZpb3VG2efXdpb"
    "f+Xcv1va7/gr559F2r/jr1z4vk1/ep9f/JWLj77bO5tMD77b+/eev//ev7jb2f6qPLu07/SmPru0t/7Km3+3tN/xV94+i7R/x1/d"
    "7XJrrlmqphpfzF7vvMDd3rI/TtWrseHduwtffdp+8DA+/u7T72S/e/701uMvvv9s/uqz4/1nv8xJGMb6d5+uX3yzf7/ad3tpvq22"
    "198fPfzdjpbX37B338/dvpI/TpE/vp/gv/r0x/cTwu8+/U72+PnK2A/vJ6SvPvv+/YQvT9U/vp+7vfnevvnj+6lfrPbd9xM/f6PY"
    "5733cze3/Mep6cf3E91Xn/74fqL/3affyR4+XRk+/f79xPjVZ9+/n/jlufDH9xPzF9/84f3czYt9W+377+fuDlQ56TTh3vtN5pGn"
    "fB/1I9lH3u2jfiX36Lvdvru7+ZhvmZTfvtt7/b6bTXnavd7bR4qPXMWP9nU3l/GsJ/tgn3dzEc+ytrv2fTd/8JM7/uvs8K5910fu"
    "2ny072weebeP9p3to+92++7u50DGk+723r6zf+S93tt3Do9cxY/2fT//8aQn+2Dfd7Mfz7K2u/Z9P4Oy/bTMuzb6WSblYV2/2tgn"
    "WcX2LgYu5vNP/8pR7mYymiDt/KChd7MQ+eT4hZ+UT1DeoRm/6Mf9DMCgN/vh7d7P/ms/38vdN3Q/C7DcvKFffiN/9XZ++XT56u38"
    "8un61dv5+Om7mXS8l3jvs/b+Z8e9z7qv3tAvn777PqO/t+N3N4fMlJ9v5tff0FtNvvrC79WbHuopNNta17NOs4oh4C6CrXF9rlX7"
    "Kpik5UZhud5smtbGkEfN2dpRajnmBKaGW4812zG8Ub2kbfxwBl67X6by4eya29XO7NGUvWcqhHUVVe6wbf/jz//6z/93EVNqFHiw"
    "xP9mxOUXfLgR16a2WkVot1PkHmnnMood1e6RV0Homafnjr6EUOayy9Zm1ojF9A0KOop3oxszJ8dbGCmlPDa/mPsIebo8c/HVrsJS"
    "jJjLtGP6MjwOzfu+qiur3ogrHc6sqGddE/8E/qne/qwU4S3UMWrpi+fIM6Tad8hp7uESK5C9n9tNx4OsHV1oLFJGqNjbGN35UYo7"
    "Wr5XH3jqWFUZ52aZ2WSniqKQWAjLmxu25xJydXVas1rydrbRbeoxDe9uRL4YEk/jI6LqsoiO8DernH33o/KlLKWRa4/FcncX5lyl"
    "Akf8HMvP1cyMfjfM3Ndat8mtl9auA2V3yt30slAFn1KNvedZ+jYtRVTHuDVdbL5GX3KPO9hShhnB5MhDJ730HyLLmj3ChuMfc2i+"
    "9fHdnlrfrXtTCy+XZejo2W4s7S61V74x2pa3WZ3nycn7XLbPC1dj62St/ZzXb5kzBb2qVbzr1qAcbvL0vIwQZs3F8mVj9Z7icK1t"
    "y8totZceasnL/9Rkf00Jk4FKn7XSRhp9O77AhMZX8sih8yK1OFqf0AJ3sMNu1LphmzaVjnlhVpmFHnFMZycqrO9gKccKNmUtMqo7"
    "B9aYY2UNQy6ptGDSAAekvcDTOcbi9kpYhp2l9OhuBLbHKmfETMf62kOz3btVXjOlOXzYIPE2+K7kZ+CN72LRy9FxQLZh5/w2P/NY"
    "AHbVDE+yVmvmOu+qgujxKfygduvHtJVndqrrnHFPvAzGqYK/tOIMM7XeC2oyeRkoSBn5Rmh3CK3SXJlfuRX5KNTC3fbMe10boxqp"
    "lFpnCNv5mNph3pihSbwLP3Bew8TEG9jJNOezimwvAvO5kvCJLDAuCmXdY+TSuGkarUacTu8B0sVt/JYxdySPKly00ydrbgT2V7WI"
    "0uBDKY41f7fKdSd0dxVVz0ecJHaXW8sof09juzqqXy0nrJPVqzxw72aUhZ+qOFb7pssuNT66glkxrmVKNaOGwBdArfAKFU3xfiVc"
    "RJ82LnQpEh/wzHHVam5VIxzBIx4Cu0NkmWB65+YII/hIloPXl3vKvk23WSG+OSabFWb6Tnq7BfXGaaCdO/QGKN+4qcuwPcNj4mtX"
    "KG23FLx0PaL92U8zeCV5Ht0MVp6Y+sRVtO3CKAPpEyZzI/IFxcQjkEhB5OIQ/J3Ie46sHamc0i5rEdsay1KhngQ4P2NiPWKMBkcb"
    "/GxpeZebK7zVUv3sxzwa/HeUby6lmRJR59ztasQ1FKyuulAmLS74gEDVUKyMXWz5FqzYx1vVuMS+i7eIh8M7jPC9m4tEQBkXMXoB"
    "DmaKPqMuaYRa0UZcV0xY5WDxBg9leERfNk+Q00r5+uC4dYIwyzGq62miDxNHniDfce25bcXUQp/49RiIKb2hJFiDUVkzGP1WNfI1"
    "nNSrcqQ37b5xdF7dE3BsiYUJsQS3Rs+1hBlyRF/xSUjQ5VVDdVtVyyUOsNpyiGnaMT0lDKJlD7kRS80ubq6IeQ6tEX444hrt4VdG"
    "3HpSQEGscQ9McNaKDt2IrAgYDyiUD1FxS6z6O4ExJ2BEXGjNjsGUgDMmOEdiw65rzlxZPQt8kVYnhdiNi+57orlz7EPgPGxssSGq"
    "C11RLbbEcqvFRNurZxsMX0WwYcmN3lSvshCPx855zRuB69XJpcNfmMPV5XcB22NMvBk0urmBrwPMYMYFZJMS0bAut4oFdmB8c+Hn"
    "kqZDgYBQr2R2vGCMlPkjnsZunDERG7yc+EzKW5WchEsW1k28QyJCbUXGiWv2PHTFN98IfKTgXaBmvnoMJ5FvBA6hgTN934cud49P"
    "JkyNDBgCjAEoPfFqqgfDWiC57lysLGBHgsxaHivsZgBdOE8UXBXkaufkteF6vWt94X8DOmftjhn4C9khdoLF/AbFYJEl3Qh8iX3u"
    "+OtQhuN/022wxsnHzgoBAM3KffPFmAnQoUaL6w+2E1o6q95ambyn1VkVsA3Iqeh3BKtmBKANLA1GiE+2fY+A1eF2AA+m8G6QErhW"
    "2uIlhDVQGI9jMSrR3/VGYHd45MtfF2RxiPzeV8yGoKMf2BdFR898H56oUbLZfDPmiCqOSYQYhHIDhE/bRt4aWKS8pUUAVonWOIUV"
    "AVfZ4AlMWgvdcjHjdUBSHgTQ+dpaeZmBOGwdaih1ug3W13y+N+ipCCi0XG7CdUSuwWsb+HmkssllmHo8xnBLLkwZzJCxbQBlwoOu"
    "gRSWCGkEl976jgBQfcPVyog9UL7UubaglCAdeBCIyvKjGy1quVvDq2YeExgWsrtVjAvRKofxxYOPWIn+PowkC283CRcLfWrGEllN"
    "wk2DL3C5QagUVxZznPwZUqAN1YXVJk4hmQPH+V3BbwRBfMucYecIzSEITmeW9AFUVTduEWRrE++Bn6GpPHwNuEON/fwhcjx02R6Q"
    "6NDiyzq/RxiwW4BBTpGIisENxbM4GzADh2dAc8micwNkVjeYyBBviINTmMnxqcu3sN4oUzVhCeArzuy+UClQipdTlFfDakbH7RGN"
    "Wlx540iwyzpYO3sjtGKfu2pzPtYbiPZRn7vCTxf4TkQtMwvopWXestTFdlOyj21Nzz2I1Og3GiEEzF8EiCssqhOkFGeHRcJsun59"
    "gqHw3oqPBYgB4q9yI5DApXDKG0BwgMgw29wE7GueoBTDHXptjn+7patEOmyK0InfrAU/nwTcCkECSQFDIRAdwMa871gbLxRnNZKF"
    "Z87NIxzsGlJFfIRmgC8q0ZhIB/zcJa2g7jTCCbunYsMAbHMzkADrKGkb7zDfRD57iXz5oKnm8M/aErh1c0S4DBgTPwcwm44+gFj4"
    "StBVtGAkwEBFQaEIzu6M3bOkBLm6F/oQLyP64IV8A4gZGo4bhGkRhwcBgDhYLd4bpCWCg5cjwtjo0K5cBEchhvs2kNTDzV0Afr3S"
    "qfdUNTroxhIMBK2hfzo/WB52jT/jddfcgJ4dfA7zXngpS0io41gk0PBlQyBFtWwRWCXigOyHXhagOixcMLwcfLKhUwE5K89LlEZB"
    "k3hwExP2PwW+JizGI4T8dHW3Lk4v1DvornpgxckbRaA5Ylm7Y5SawNq9B7lkwD/ukFjFIjXxOd382mZozLVwvtstIFMHSQ5+E9YL"
    "Wc1hJ9z1iNokIObB1aAGDjtssAp1qMnpxitfsxbNseECZTtUQ/D+VugUUQxuh/EXJfgG+STWD8MB2NneFaQ9DxYjftdD1JBPANQC"
    "6PPb3nBDMfgDJ08yQVN8gTZoXMLVTIA07j7CvFZbfRTeVjkaAYEJXMdluJv4d01eNAfoTAe6iAfYL+88RosBR5MchBf9ma7vo7OU"
    "1baKBSynkZatPaijWlH0gPeI1rJwwsHXxj2wIR4QK9iQEnxBqhiyWE7Gq0BiLawRZ7ADcADX0XSAw+e9SARe6UafjyzGN3D/hjPe"
    "BxM4egeQxywUkbz2NLawQBAbtQ3iz09ETDCGlW0PowGICWNbOxrtAEYAtiaigo0V1q411A1N2MAiHD24IAAsStC+bMWzN2AAsheo"
    "bwX6uxt4fyQy1kMxytVr+Hd7GJE4TcgoAbxQAGboloIWLxASNxOmWXGBuMbYsD1P/Kqxe8AuIbiUeDg4M/du82Ak4GSwB0wUlIof"
    "6egrbn4BOwfgENhCTAE1piErTbkOHi7ciHuJfelY13TZPFQoeU9UzfDa6cRFzI5mdbE3aCjBBZcMzsoE7E3ALeCL5EATIcJTa2at"
    "LFToeOwVMl/oW2mewEzwaLx+gjhyY7aeFcXcUgix2oMcdjwLrjnF4MKxgj9ETj80ORzimmMLJt5u0VqwQgmQykxYRdDJ/xsHbpOL"
    "WugEdIK1im1ilC06zcuGpsL6ILOlXHb0cGwl7qjdRlzjtL1YiKhfM4Bnw1wWzwpOhbWG4oZrQsloWcVKjbvBF0dGZjygfTj+OnaU"
    "38D9W4cjwE3iA8gFeC+QXWKU4oIRlwe0EIWgBgXB9wweKVnlufvE4eFmj0n2CbRW8AVgC94MSG40oiYain5ZFn4HWWWzZmu7cvHC"
    "W0j4d/hUhCa0G5Eve571UIl4qIf7QFHFnl3ExYI5tXM6AzFg1qG9MpwIulCdSKyz2v1kmSJIT+Nk5yYizoNABYfTzsQR2DZLh2OA"
    "WJhy2TaENFYetOrNERp5mywthHcPAMGEKtTbMPLG+MKhw/HYpg23uxcGPbWpa+e1lY0HI0S4QQyNPUJFBPIXrhlfRTToRXhLPEPw"
    "bhP4unsDQykQHggOE9FrFsLEvNS4rMYZmjtITmBR8YG+otnaLV0Yc7EDT/1T5CM987IL566bLvaDN+4LyolHBFqCYcG0AIkM4EVL"
    "18R9DNgRYdoXFI8wrh0ZyDTQ0RdIzL4GkQWhJ4CuBcAkOoD2oL14OVxEx3koqPgBqcxVrskofQB6CF2ArYC3b0zPv7G+dATreuzh"
    "m3dxD54oJGNKRctRrqQ92wEJQUMhmHxqo3bO1bddUMcCDJYUkI9mXfc7idRoLhq8EVG7VWDcrn3Nhl8unY8P1BgqSzTCh/AVuGHi"
    "Fivkq3U3inEkal70+NgCuG693EJOH7W9Ev0uc8M1Ddwsbrw9CMdp2xfF4CkRhoXfwIxjMz2OQdSwINKDjVgPQt0NKoYriEATC64Y"
    "0aHhzQ7PCido0hoTFqLtOYgfxLaApCfRf9wQqCNPNBwxrxyq4S//e2t6IPRibMsL1tQhbY3oUInQTQcgWbuJ2AuuES3xEwc4YodL"
    "ELcqou1+PHQDoWKqiJ0gWzuLzW7HrbZOgjpqFNZ02ghy/DZuBZwPXC02O1GaG4EV8crhid+4iP/g3ESbIe+NaBhAl8AKqKTrJhdY"
    "Xfe9+wi+BUfwXlk2eDNBMODekB5ofwQQYoodRDaLwGtaQuGc4I5seYaMCqyBd4M8BZjU0O5GmUTYrKPRoB3FG4EvO5322GQxh7gS"
    "O99uz+LA1RMUSbjDJARtD2uF00DV7CoDYFzGtI67s+wTgrUzkZubA0SyeavoaiMsYTWgALoPbsIWuiGGThi2zXETvtGACBGA2dSG"
    "D3HYNdh+NhT8Znv2mrTrD3XIBw8Jt4Z3JBIMQALOvUKQwqygnQX/WlVLj6ToGu5j89J1lEdIFxbPFhCsw1V72XDB35Ye8R0NfJbX"
    "zMTxNlfZgrTNbtQg2bJNF3TD20SM12nDPUqjbkLIkTl82SGyh1+WyO/PRiDNuGptX2DYCQucnqXV2eEY9girHicMm/MtAgi0jwwk"
    "4D5y1bWVN2APc2nYo0duoijrgO+COEJlk4ERoErEi8qXQhgqmk7IMha/vbOO829EfjvpS4dju+zfx5/bWm97wRusrS1AwMroHa+r"
    "sybMCu4GhuR/rDJJLJFDOC3yPLK9trX7XsxliHaAUxN3BygiD9x61fZECjBnX1bi+yf0ew74YjXgP9DpyNZKHY/dtBuhL4zvON+7"
    "sOk3cd8gvfZQeFQQbLDaHUGJs+kh4VUnDjrJ43Ff9KVi/Thv5+TCeSUt5vQW93iVZvU8YKqWp2NZkkiit8JVQ8EjLMgVSLCAsl3H"
    "kNcGGxC1cbfxp8BHMnc+cPGFUZfD+N7vXOALAO3a+C6oWUInoNmYnbWosF2BmK3wgsL0rb2uiWjCc/z3wDdcwwiEqbmtwyuwlV4f"
    "3oFATOgu2dkIXYByrbq1LWQrKBa00jzoXpQSPnEjtL1ugWt94+GVDzR3Czpxu26iqjD/grfdhKKejSCcg6VpS20O7AmMOTEiQBI4"
    "mpelzYiKu7kgOHBziQmLO9z41h4JX2u3Hxi3j4Kivq1VrPbAO96oZqdQhMaj/jcCX/jeJZDEqz6724N2c2C3iS8NfbQ1gdEAMxxs"
    "zwJDLE8hCOP8eOnAf7t5oRaGN2ONYLZ+LaqoeAO+CJjjZ8Fk+SNcE6EdtUUd+FUsDb2Hi9c88KaraNcOWBm1eXgTqsMl8pkrSb14"
    "DfNusyXAeVkI3Lx26OHAFc8AnbZJjU+H3Bn0OHTrGnRi+yPCGe0bqmN2O47Z7ewY2YYEQhG40QABBR2TgwR9OAK2BdZV7ZquDXKy"
    "2kisseBvK9T8RuBwuDhz4Itw7BPFn6epF7bXobc9Cb1I9cwO0LC8tOKRl46/wD+r06OLsO3UcL6d4B5xsGANe0yvD9pFx151Rqhj"
    "PvzvqnA+/B4KlURWZXx4ZyBMiXw19IEXa8qCS+dbpYjHpuFlu9AcOFlKcdunk5injaumHAaYpI4CgF+jqJVwDssk/D4+Laupr3Zu"
    "bWj4D4CG1Ylpum6BQ1yVl5TByWB5eWWfHK5yCsUlAO1wdS3M1gtv5RzAGm11Ik2tZrgbnxze9jntFb/lI5SUdyfW2fJyC1y6g46j"
    "Ul1YdtwkD8yC8i6VcLQjYlsnLIA3JfSil2WDi69eHavFpfGy0H8IZFY01skCPgSwgppDIBwIIPIqcaEj8+oiVpx5VgL/jchvu5yX"
    "tBx3+Iv0Ti0wbt5VdHqhIaQAtupdmxIG7Bl04jF1cFtQCg/Q6x37BCR1be1buevjHHXwgmBTg9DpAogi9TXrUm6RWwdDxVjBy4gf"
    "BPuL9mhQcJ4FQ7kVuBwh5ILhLkcMR37ArcAbpQxBu2kCsR2XxMqA8lcXSYITQZCb0TY2oH37OjfAM7esJAzXL5AqVNZfp6KuFhQI"
    "zFDxxBNgAsYg0DkQV1L3X+XroGUEblRP7xPNKDepIke9SbhueofrRsD77JZqCXh5g9Zg5cvlUVjyKhjrHTrSulKKDHYYkT4VOCFY"
    "CUiEhy2o2FtuJtEu5GA8OI8vQsbolz+YKPpLPBIGF/TkGWFh8MTE76NiCnBhvcGh/0BoZIvVK5EtmewaAL0oI+jIO0um3PyED7HM"
    "eHCjPEaZhBqaFBYq6YwHYSCBrW7eB6hxwniLOqoDno9cIdYWhD1XJPoa2RcuMRGawWm4C94TcQ9gv2tt/LwfJBiCFgK+KaId20BN"
    "lDDrO+/jjz//+svfrdZRrorFI6sPNiGmrJJs7mYE4SaeohKwWj8jhz3csOb4wJLxcZawlyTCb7x11i3uWaf2flPXpsoOB8XFn3Kb"
    "Cs2FNzYUmpBCHLukDQ64msJFDLZiDw5rw3lnNB/HAkBASXPEO6Tq5tQWxbZKnAFcAZKAImoeX3HSQmt664/rfRL2qXrxjZUGZupr"
    "a1MlVOFDLSkhj9/qR07S7nuNfTCmKq4EGmtzE3m1JTxisnYTtzR6YdYCw884QX4pgDDtwFonsY3QqL044lqp22K1APIusjLrdaX9"
    "p32z8/7W9XaEhz8kfMBTdSAsQyUcEpVxE5BjyDeBUgME8Jr7yK9ceN0jJMxdeNTvr/OxosFlV49/HdrS3LG3pq0pr5waUH4OykDB"
    "u0JQWgXJoGw97AyXqKA7UFCT27Usre3qwp5AUNAqHdInbSfjm9dWDgYQ1Q0zjLb6YFzm6sfudpwJJ62zUvcCBG0o/cBnHZtwEwDD"
    "nDCqqXMx0RTleUXACHgymRTk1IcgXIvfX2XsBHwYjlSf1EDhgJueKxEvaVMETRyrlBZgnCoNCrNavmzAhljM47wdKKIk2o3uFzAo"
    "0Ab9r8NBE3UMrGETscPoHCE/FLcgr8BUMD2wIvXLKn9RjRzfuiN890l5x3ksZT5kb4HRfgMpvd2gPkTXqYj692f4LmG+bG2KWlRH"
    "2tEtfygTWPAwkIZpaD1AA7Q3lDS1ADsQy2WPgw2gjlILtk4EloNtaIe4Xe02/e5J/fefNLas07e44IVVyasW080E/6GjZ3+kWQ0V"
    "8PZ8cCaXoDB5AWxyxsL22mlp+I42mDJ2AwbXYBmlHKCXDWYJT91oR9yieV456+DD7gpguVh/edL8uyc9QXtHhy8KnSrbXJRVsHUm"
    "AE/UOePQpklcDnOr4CxY/oaENB4WjjEyNMK0I5wt1gYP7BxIkt/GyoA2JmjTUGe+WzNpvBUpLNqGFkkygDl7edLyuydN339SbbgG"
    "SIDSJmcdGRDfYSZN6Yk8C0w6oMFdx5B80uKGo21gNuK/uOKSW3PKWUfToVM4vWEHZo+6y7/bDqtYwgSshCgMHhIOsZtXolLL6fKk"
    "X0wFSGfZKTY5oNfamUR0vE63CfevBMBePM49xCXFhGRDrzA7HVvhmiJxC1K4TSxzWGCwHiAQ+K124Vmn1qG3FVq8ls7Fut95rZpc"
    "cF3faaGuq17jazK/e9IT7LQAqMPBzpWbhlkBjJXlXLayhfZQLgfuE/4cABtGpK97/IrAB8+C59W+k9l16YyUb9X+EbAPPZ0mWYD9"
    "HoUA2WB2rFRfAzoHQYENGo2Cujyp/d2TnqC9/OcSwbZ+gGkGJjcNf4rXLNO1vJOwp47+gT4241pSh4NpCzS0hY9NPNH2vKUGYpVS"
    "AqWmNc6juB562LO4YUyQ8tGAZTDLEhSuttXLvWhvcr970ptN0vTAhtX57WbfRv2+ZYdXwAPGbIH4HZdFAHIgnx7r1o7MIv4oc2EW"
    "0cuBxVdexoE5pnaUZkfP9sKPtgw9HyP34YqDluFAbLgUE0UPsLIenFSEV6uDaK9pwmVdv5hC8e0F04nHLCcs1dQZtoCN8dkqgSL0"
    "FTReBR1DCZMyDHiKJa/B5wj0RdkleI5VBNVxOBuE60xKJmJKzmZWCZdBsB8ZjG611BHUEyrqq6MEfk3bOKPUcQ0V9wvSpQ83QzTK"
    "tug8JMwNHfyljscmqv34P6Wnb0C4x6Yh7hqMNWFt4A7BjlJOgN4F9+j6UgKdsk2KWTgZqCFudddZewUbFm14i5ipJm1q3YqJYSx4"
    "qI41+7BOlRO127rMYaoVqw9wSfRWm3pAbVf0ldHuoaImpdETn6+g8H45/VByF5wWTfchV8LbW9kMLj6g2LzSWKzOGWpWmMhKJrNW"
    "yZjLgluBAjCyBTFQ8kVs6OJKM5+w8aJauorSNG0K4ZNU7aZqIaCHySG11gMxVsdAYhlL5X1KVQWSKb80hYXS9WVBF7aBOZK4IVwz"
    "KQMzlDQJx97lSgQYY+ccloNPTiiETqaiuzq5e7DLS7/wDCpFIdKodAtZ4pG0jERXal16DvrnzUjf/vvtn4Q8qTbwz4H3BtHZOtj/"
    "UjES7+MM4Do8MMtqo4HIfCS85rpVSAQ94v+J7aWhZfmSyx2BLU2HNESHMUfklyAac4ces2Kh62XiraKKYnINLukIbuxlVGaod++W"
    "xozh9cS9zVXvyt+wUexhJ+DFBCCbo1AhE5d46aHhxjANZeZhBMWF4yBjAaqId0OJOqhA//5a6WBOtaNzKZ0fJFtV6VdVTRjw6ENV"
    "ILM6JfPrxDEKCLcVs8pOsIY6Z8QuA34MC0aFVG0oQ3QNB1bQMp2FAn4tfsZrNCBIZDtoICY88TaXtaqfahsIA0TWdeAGSs9QhqXz"
    "5fFWMP/Pr6BRQmOFtwInEVa7tA0IQtCBChxgSnUeJnkITkc2nL7CpPW+WyUsKs3Wwh2JETriLZH1q0owb8payW1BoIzbjpgvHz55"
    "ZfLWVrWRFQZ8rODdthPhjKYhYV6OZ67X23fED5eHLuCNiIEmTyWTpqMIVFl0MMRsvr/OyxCXACByg9Oo/tArmz1CXzDGpliALhPr"
    "pkoCnQB8qBYA0XRm0FDlpFP8Nko3SQnzPUFSDFAyuaJU6UFcVlmh9Ur7ruMoASJSAY/4g3ZZ53sw1wqkVJUPh6A0OZgHHEdbjfpp"
    "0SEVUCigtNz5BI0DhhGjYWvHwb9X8j7LsvO2vILYE1i3RGg4MREGk7TrY7Xv4+B9UIIy9yQ6KnO3BhAHGDjYotlvVTNos+M3XFvV"
    "4Q6LjsLTiknV1Dj55LxaMWgl7sFguw6brfxiTzyyaszXTjvumZWsffypysaSgyWCjVS/5ICQiZh6QuzsOoMwKwGdLCAr8uQ5u+V7"
    "HEFZND3js7pSPBqeQOnxQ5sYvaP/xAO9wLTAEtajylogcC1r0FRbHVmmWONUwSALbDfEQmdc2uxRCoDF311W5jPMbxUdAcv40OSV"
    "iE+0xR1h+0P+V2XB4/op4TK/lKiYvJzEZNnssgkj4yn3CaQxRKXDZTOUW9C7456AHhVijww8x/aP4vwVtb8IUGfJAHRF1UYCGJhS"
    "AqZAr+UnynHqkburLfemYrqi0kRzRNudeSBoJhRgTnkhQPMFZdxvvIIO8ZZMazDsHouDYGPeQIOE/wsK5don09EYsRaifnx6OYQd"
    "yizAC0CNvEq/0fKJPVcFngq42L2esHJtdTxEUy4BcSepZgEr1E78wN4mq5qg1vU4gvZK1+Xz0yx7JGejnqrh1REiurhAmE1HH0eh"
    "nLRIpWZJ221Z28uYMs4Y8Kv6jaZD8TQvK/dpE5lve+p3GzBQ2JweeytzAivDszu3Wm8Z35uU7tGqQIGBoMF0svUTYqDMPz6UVAXh"
    "vYDwUePX5nDZDbiZB+qh1nyPMp8wThbCFrdxrHKEFcOH0qBjvLpaeo0q0OfJxuWd5E83+b+/UDym2jSkCsMMUOqiekCCWjhOTW0B"
    "SqRJuJ5dg2QtikTkgnUHgIktpfYTIrA2qWFfdikDQdn2C2bC4gC71LqhVYhrGQTMVLsqSSSlqk0auq5auBqOEkbEsdrAz7lKMNw0"
    "j62M9oGppCTzBuBJgrSN0m2SyiyA1pdVLg9dZehQMpXwpDwEB26Tcjl8yoxQrKlcNlV5yZyBw8NWZaCtWKE5ieh4AmueUZkJMKpK"
    "/NnBphQsIVTVv0MpNjjGyO/asNQYAR1QNhbAQ9mIoF8Hq1qtqWRbBydyjDi/NXZMyjReaGwI2qKxYOPRhPx7wDBCbya3o5uHVrk+"
    "VpdVNg3+3w7GSvwse8RqGy8dPuFYVHgXoO0oJkID+HmwwGudb7mx3Rnbwxbqp2PrpW3g7fETQOrFGw9yBUgWQOsJ0JNQ1wgJn8pL"
    "lAsIQJruEdhnsLmq1olMUMPEH6HOkXA4c9xwIEDOXg4zbFtTnYliqnarPcgaWeW7ranOW2VPJK1OFcuazJ10VhMX9GzVCAcH0PV5"
    "dBbgP6w4XSnB+Kot0BWUI3zCcQOvTEuHTnZh6en2RFZo3C4oJwTTCs1H5Z6lZlTNoEpVfBnMDZTQVQjQjpwOC47QEfEeWx0atIZK"
    "oxXlXgPIAoHXvlrKukUAWc2SLh7jbkuv81bZ6jSrq8ER0EgYGnKXAi4ECuqJ7srfTmooAVoU4/Rx5qMQqaqhQD8hlWCq249Roikx"
    "oXuiQdIBW1V10VI/IFCZkgEr+A0XBextSgw4joKcfPVSrbaUXqlw8E88tabPA6Knija1aRt1MFmjyg10Aqas4zi6Km3ThRndbYd2"
    "ol+ODkjHA2NjNajNjHKVE2Rtq01XGrxta1nV5psvLCJBWnVXhOc4Ce0n4D7+d9tQVgZDWJa1DyV4eax/F3UWshVXIGeNefFLcsVA"
    "Za8tByIz0S3zB0m7JYRQgxos3oYyR5Nyp8LRTENlPiPFaGsILHhEj82h9+Oyq3S3ldyJHgMqk6L2THDBROnaplfOa1R1blAWh5mq"
    "BEYHjt5vy7M8FUPNeUv4ExIJCnINqSe4Nxrww/RZeW9ZGYBK9IWiEx8BDU3pY9rBqg6lTEeiH2saK/hPu34AvaYsZLGZpUqCMJqK"
    "QQdEyhz7oknHer2oUQRUAb4x82WVw2N1OThgjIOVBnxFDkMHACr3nVVNUcpAu1FbyNPGiLXnEZSWmwZ/jFc7Yy9FnbLyynijXpvF"
    "e+QawBoTpa3CaFBC2HsaCGaH84TqPrJTrb4nlqh4P0LCpCTK2VaXN+X+OoCGI8xFz62G3svAuaisqdojnbEXGPi4Yoy77QvPW2WX"
    "YLBHgxrupD4PUQW4kHhtRzgI7FIdcNDZt9wf1Le6kjNgj1/Al5ywM6jtVDW1kV5DCBcfdcA2mHSCPoYaF360aes8EaDxb0FFi7hs"
    "2IZdarg3rErzp040zZyqYsTJVyXp83qEn5SsB/vcDoXCdfClGU/itovzwkrutns8b5VZq5E7eLEsubCxKk9vVDRowJLosYX5B1VE"
    "ERVz0NKraKXAlje6fUL0U8lp0dY0MNINnFMuRx+AqiT2MKZTYsnoYObEzYnGHW7UclcrGOlx18ZCgjQtwmf3KvEo+AjCN0S9QvNm"
    "5B0oj8ntqiPoxkKojBQE02y86vJjuV/aMJFFdJtHixrVOoqOrUQg7B09NgTq6VWoryz3ngt/qNMtU5LKQU84lbJTHaiwm95ahhKN"
    "gJkHlxugbu4VQ9Fx3S6u4qlwHkUl0OCM7tUJy29taUxVFihHxmON2g7FMLfSA1l/ZWzbgtcHSS0jjsufAZ+cKctfT6VKefAq45kz"
    "8BgYZL3HAvHE0DFEHGpFiUrx5wuQ3FSi0pTIM7WvO9CtMNIpyWXabgZ4BXSP6LZhJjpsd9ofQgEKUU29jILav6h1AE5MT4FibmWh"
    "xa0cMUf8VMK1PxqKNSd+Pfl/nI5Ri8WtLjtHU88U4l4NTe4N331lJY/lfk5fnWNU/Td8ADCaWi/+6EYD3ijaWRmE56itfWtWbgAh"
    "tagAacV9hi5LDVW4BP85ik5B67nFpKIg0ww+IAp4DYtnDlM5iBX4DjJWfrkFAeFM1IgkaysgZZwDoFqVRuuobQmgQSyjQ8uTitCN"
    "WSJZoZdScEJ+XPxyfSz3SyOaNjaBgqjhCmhYmB+7VIdHp35LFTin6A1l8SrzSk2tJZo6v9l8QvTrE+cDMerKE4/GpwofNmrShn/F"
    "A7etA4zYVVhZ0HffRlYfv77VRDEe9cotKT92NKfT1qjOxqMHZUsuy9voHW80YpiqELTH1liJWKX6NpRLAlZ9LPeTGiuBt6tZAu4g"
    "zwEP3ar3zFtb0h0GPgnGxJZDa+qCP5jhclDjhhM8Ro/eq1ctJCf2o7tizjGrjWRaUecFy41S1KbBi29uHcauoa4u2WzU1uLpAkSj"
    "jBEL8A7qDLr3G43ltUSont15BmX8RyC/XyqgV/MSdU9Z4YKXq/ttenO5rvLHdGegDKQjAtVk9bjXOsfRhXJ5CyYr55w9fnuDeR/e"
    "1PaqQwQ787RKc1Stg1LAAb9qODGiSnwdoUE7gUPtAtTpVUXxcsusZVYnHkK10q1AJmqOycdU5DV4DHWhUatxX1AnoqSqrrRr5OZl"
    "07/6Ry1zPeNVnRD+UM2EhhUUDIOOmC/YC2TX8A9KMlerRueAIPiOBshT/yG4CVgiaBdOvcCmbdquV/VR3lOdMJx8Ms+Hi+ebQVAj"
    "OB19eZBHx1G0od0ZIssl/NXwzKt8AsVOhFzccdDhlFNn0r2Uom/4ehCyXBcmpAY6puyE82BV505RDREz2grVBvF50NxQInPXFoZT"
    "C0rV97SZbau4JDWEKq33AYNHjzc8AHmC3OZlleOnlScnOOajBR3Y3mnfFRzlkmiITwCkGpxr2vxlCZRPAqbFIZdiVK6o/BBiDmKc"
    "ATNKm0ezedX4TSFIdeXsKhbh9smBL7Qq0k/1NbZFGSBEYEsABvc5HQATM/DWVdINwWZLqN4b4jhVV1y5cw/qsl5VlKX6Gu7Rm9PR"
    "xWXzs6YHb2W02KZK/ZNPs+6j0esyLXXi0bKjD3WjXU2Ppsbva9ioUj0l9+AHT6B/PCrIAc851pSJ76b9SbdBFWoxk1l5gt/YsNSj"
    "9WRTaYmZfWXVYpZYZlcuYVkpdC2gn02NRmSFIOtc+W/1FfC9mRR8h7MCnD1sQOUaZV/Sb+pj6d8/n3wD+wjqxKJEd579qLjv1W8V"
    "BgzltXX1n6rAPKVSQCHMAoooewGWD4xfRf1FesYeUj/SG3EkAWgcMwqstsYBVKQFj+o25qyFtq6Jf4cVuHVJE6vlwT6jXa+3b2kf"
    "rjyX9sOq3CMKLf8JhHZAf76mrBNA81Qy7FAT0R6zX1FDAtQyNWc8QZlZByMzsKS5VmwMalTVs6WvvXP20WgTD73FCNVNTF3eMMaG"
    "LTYRWpvVtzIfxyWYiLUNHwiWK5dm2s5caHatD64KXNWuoz/bVj/2fHQDAx5bnKQa9Pe81DnEQFyzU8Od3eIUSajwY2UonbDOq01r"
    "R9ZBfwXwuq0yS9hegHnsxnvetYa1ZewT5qFUvpyUF216WnbbubxKKUDTDcgyB5R6HAnu/Igw2jsBVX3n1RZMBd/qPuhtwQ2BbDR/"
    "9K+/gjEPXmeWt6l9xFYTa98AoV6OLBRv1XZqOfXeOpoF92OOhnoyRx3ldzHhWc+o2FD6Mko4gQ52qZ2Ah2LumoaVs4XB7QX4YrG9"
    "A4OtAls2E8GT2lXUqtakan8c1NddCeWIF9JOwGmgYfFNPAbAJ44JoEsJaM7iEwVsXXte1tk+tPrSeFFU8P9W+rK2GY8CHJvUKcMh"
    "DIoUAPjqfjyPeR1qJgIlFIw9+gd++9DEtBBGqyEfzeWaKvKSMq/r0EAEPKjOULNS/F1SoyaV80xl9oLggEBKJd1Q1F1GSHBKNWgO"
    "Rp5nYoEzOE190JazihqDV2Y6dNKtIA/f5nWV3UNXWT0HhwK4htdMvlkpPAB8dQveS/+EYXF6TX0Aj1KGoD5LFTrslYl8Qgysg7gU"
    "HS9Xa6vNKPCy+j4l1SVUbRM5Aorp3BMHxrr15LStX0BoXclfqkM7OjEJDs6qXSNc8hbpG0qKxo9rFwYWqVq1IRezeF5cnn/T5UdX"
    "bGuRVQzEIjudPN0usgXeKWdHjcbikEteUSV0Ko8es0We5oQYGIn5Ov0YTl3q5kiJoDAG1qUyyuYCIMIWgMj2WFFmyQoBz6rzUVJt"
    "Aj+rA/p8NAfr6vHX+tRLIP4D7o58dm0sDZV74qWVBbMFUgaYoF3SjIJ5bMV2JjqjptNXid3UcQld2c1qLADwM6ua0KtzAqjJBxVh"
    "NZ12qgod9ThjlUc7xryoX/Y2K1RPDM7AjnbscwIbjMVtARi8Zt043ACARPufrmr7ea6O6Q9NNUIbCvK5Y4sEfVXbqbDUudIm3YwY"
    "CzhvsDBlGqmP4tr1ssrxsT5D/TpFmaYq/PjXn2p8sJSoLoBR0wKszo3WnKKzsagHerfxBHYCpp04hDYwZGBo78AFM5SgrNkj8GIi"
    "GLQI5KYE6JSUOgcqO5q6d1XtaLhNBP4pWbhD71RFDQ7Ey8c9qtqMoUQg8qgSN6fNUm0y4TDU0KZdcUZ6sM9Qv3CnBjXLWQ2oCRro"
    "pRYICjYLf9bU9crWscCq0Wtb4Wh5DpybBKoTtBn3mJrF/wCDMZhu1HBW2dX5SDG9ZLFbljy1Szs37RS1FTq4IYk5oqExoq7QE6Lg"
    "bq2XjCeCiqtjPf6mTbXb7zEk9XCbiuCqmOvqWbDDZZ3zQ7XZq/vZ9B0vZuzENEfsGkuiY/oWg04s7FrCl+HIUQ3qs9MI4TrdcPOE"
    "zWbV0ayorkaw/gXVcwFHOjVnyqmFsOLsVHJk7QNqotTnuXPXISQGZkMnRKvHjB+am0IEV9Icy1iOxhTOByut2E6TQ1or6skR1Tap"
    "H+dy4brK5bG9NOD8ajxm1lL8CU3DBYjete5ZiEQTQbG3yg9lbEb7uBt/opNQbT2cgOYIYbzLmFSEfNT+J2GKivsYLAURWv3hNPSo"
    "LuuccgqBlrznHdSxtAX8iq+qQlFTfYJ5m36MggNiLdWeTfvW6LFSuaxqZ2xVc5SqPAM1aLiscn0sZu46fnBKMtKADe0iwHlVfbyb"
    "b+r3yYJNpeyzFE6NEzDWwjJ4TWeaJxQJ8tRdbWAxZkMAUIuOhEy9qn2TRgSp+JlI22Np0UalLKo6iKiGyq6int0EyCEY0kOzcNet"
    "+VgRW9D5SwmpxGSGRhbCWNw0x3ADlQo7bTBe4p81D11li89bQY0KnXWB50ASII7OgULGGo8MM9UpiyZq6/doIa6UY3M0UD8hac63"
    "HNRbfQ3wu+EVDwUyGYumDMI7wjF1yakhK6EtKPfJq5OUJGnlSPaqasJcE96FpSpqdwuhrfhDtariAzuql4halRf1DrFbHdSjgUOu"
    "yyo/lv/JHUy9bdHqpJ2AuNSF0selzRXwqFrwQkPmLqHoSBZuXdTXSTMyT9nNmASDBE4cOuLQsCccAyIc3fD0slVC0qW0UvOooUV4"
    "cY3S8A2PgJ63CVTBo2nDbmmWXYVOKpMIR4IrDMNrvEpF16N3x7ii0AlFwall9cVjWPdolGF57bxzqybFmlKpMzbNYlTQtnE2kFNd"
    "HlShXqrLWJAA/2lAXOpVesKOPhAx7cTaaLhmqsdk022g9/wd4f4sYwJG4zaiVZPNBbCw3eCrlwqfNW5DqNNuteLObWnLa2uTb2vS"
    "CgqETaAs2bohkqLU7KMDPfrsS2/mss7+sczk+h9ve54fP7R4bEE4r0Y9zY1oebolnDcwaNvO6FHTE9oUDRhDXbkTzmBr4AeaV4AN"
    "4t9gNe1YDR3oVLX/A0vo8FWlt8UAJpS8M0JRMprfwtTog1NDTih1Ay6uyUvUIKwjPZt3uXHMWO7o11UOj+bZ2nNMXQ2a8YeqH1hK"
    "TnSaDKFDCC+YpJazIR5MirhttFWneZO4OHdGCeBkoWNJZR05L74J4phlNJNhFXzw8cPUk+oZWlSnU1U4b+3mqZpeAx9rU7oyq1mJ"
    "gaCSo0oX1t40Ia86QLjViBSztkpacDdLDZ+95t1d1jk+ep27phBoAM6cBBvVoHaRg1BxYNqR06Cu0uFWQUlS4gpKrCISaYqTXWeU"
    "mgDTQ8Y3u6w8ZQ3DhNr57nRyIErC2vKScxPQSeo2BwhVjSnvOgHTKlh4q0W+mo/koUb0U4BDZ4g4IDl/oInXDNyqlkXqQq3hnZDw"
    "sftl38imh3qNlLLmCRnNVCA4wJrAmrgGnb15jWaCoQZcNBRlF6sa2wLCw2dqgGs7Q5tRPYCi7ri17Yz/7Wo2Rkj03LNjWip6NkQI"
    "DTQmiqnL/NDMQoClV/pchr+C2rr6n/eSNG5N86Z1RGvw6B5fXTRsqGteJCoMzXaqAl4aUucuq/xYBngssVo6qWexEqdul/jwzUVj"
    "XDSZU614WaYWytKALJWspjP285UDqvFQ2vFObeTZtsxL7aSaOvpbVtfHDhdJHTPWilbRPYM7HhojpL5TSK9CGOWER5XZxZQT+jC0"
    "ZQ8oBE4pzZJfaHOooL2X1jXUJV9XuTzYZ7SubAjFDTBpGpq87nINR+pE1cfUCXdUXGFfGhuh2Xt2sqJHmvB0Z3TfLcUnu3TezDKI"
    "4eGllsaD9N46aLiDg2rHY6VNnFOjMt+H0rVUKDPV+WqrDMWDOeVeguCy+qBEIDNeqBG6+RJcTLBjqFPf0rhzeC1QsFzZyaPPAa+q"
    "24mCc/R3qnzpi9vNbLNDeHfUSLOmHUT8mwYUlGTMGedTUD3YAuS5Yeua4zds2yPOQijEZpSfoT1StRtPhK+uOjPUoADKNJkUCo36"
    "ql/K0lHPPqJmjEmVBRAVhUfjxpAX1/GKCoY0IWnJz8969E4L7tHngP36n+oWoZ0X1qNX4oXaUTqMWZMSiP4rCVOjJiBQHLiUAXVq"
    "84wedR6u4XmTClvTT6/UoLXNrFZdPF0bGrNnsmpcdPDrulU2LeuqpFX1C+LF+73ThjQtbzSvUO2Fi1O1j1MjrW7gjlZlyTqOEbXR"
    "IPt1JDDGyzo/mAemy6W8VF0rvb+iyiSO9gZ+t54HtDxGJUpFkKrdJ/S6xfFXdaLBzpdGQqnbWO0NeA7XdxlQrXot9WcH0UmV1ae7"
    "68gEULc6Cu/n1Om8hUpmlbCFUurWbItt+5GZZNT6x2nfxKylNuthLA1KVvZtvqyy+3dpcwK/KmGC577922rCSIb1jqSJKdOUpmI6"
    "gVWNxD0jCmq2VoSF8tOap89laTbCMLtloLObmje9Zz7awGliGRDNqI2kD2g3QW4XX4tmX2eV2i7hB3V0iZqNBOJGuyFTXu0sLG4P"
    "v1QyL6SqwzkWdImCzv+b1tldiGD/+K0D56BSXaI+HBawBMvCsJ12qdVK5QSvkQDoInw6WU+s58YFgBksy7TUr/Vo7cWiQrc1jLd1"
    "vj3qlat+3IWFG8PsJjioOkKG0mJYTPR7mx5d1rc7O4mIRkUX6tbDhwnrsZoxXLmsc/i38O23TKVfPuSDDiWPjQcLW2N9O49igV05"
    "LX/C7lHScKuuPQdv1c2xqE41GqUZbo12B/NBoZYDsGtyulXPl6ae452Qho0t1b4rV1G75lBolYSGFtR7FD8xNVohQ3I0i8QpdmI5"
    "A4GEM0Ax/uo1HnsS6L+XdXvKPIWjsXVbhNquiUUKXBpkZKoGo0tFgWKqS80NmjexOzUTZvHNsjHgcomTGQihgc2tgA9x2DZoblAC"
    "wRH/al2KmGUOEHnVlJmjZoafVL+uSOOxLFANJ4Y64gQ1RgwpyUNMIjEhp0J1U1NVU5z9OFxWvBFY8rNpWo4rJzQciIIAWz0k1IMt"
    "wbLV77wOdTjrOrIW7z5GOQf16srqOx2GcRqcnDTOz2sKNS5PY2TcUuWmJjyXCfpXCw0PPNL5bXbKay4zqBZPp29VoeeSpxhc/tQz"
    "pw3AzXAnFWDA0IvqWqIaFmIuFY83QhObmjDWrrbUcTXlqx+DgsCZb3saWWBDTEuNHFvF6BpsQQk+ZvBhT2THOGvT+if1cCMcaqFC"
    "LvGMFmTfXec8soaGqPm55uKgfN1qpLOTR4Ck4zHaxh2VebBEwcFmlciR0tGo47LO5enX+fudjRphTXAdeHlsJVu1mjWzaCspanNO"
    "w2GOWuyq5ofJwZO9JtAuHaGloC3rCF8amugC+VNDXyFkgIlTpmO2uB01oFWzAo2bqug+0EnbB2VeFbp+0gJKnaKepELHbbUiNk2Y"
    "CXejBjPqcgJ71uE04cdYq57RcxuT6ijCCTvhh9BAXzRkcPPmTVMN/FABay2sBDijq3AVTjrwp2qnNIdOS4F7eDuTdZa9wB6X3Uz/"
    "RRvGT4fC/O1Lcex6vf3If7iUBwJ0HOoeHJ1Yplr/xcYSaL5cPaMDMpRleih7aNavEjU41/dc1M2r2BEF0VIWq8PZ6+yUyO+V5atJ"
    "DihNiJOl56sG1OLYNYJMow6EQTyAnRpnumYiVvM5oCXEYx3dA44Je/sCF/xj6/qeYJnxmi1CGR1rAD1uZqjmekzNtAc/JPW/iayu"
    "jvXLUMV9VeXNViviPo45Xn5Pq5mfS/1nYtA4P7c1qzmoJFAnNlOTZ4BqOohXzw0+qhGeHXZ3WeYvcjp13t1tUW1x2Hnxpp0noqsk"
    "EZ6orpRQQmVybGe7WkAbtaSH0wDaay5PUteQWs42qi8vxDVnoK4mzKlPFoiQECVitquG3/EwbYLatH3s3czD8z2dgKIUMlxxLyWr"
    "Ty1BgXjlhR5Vd7SXb8cEDxHCAgXHLSftLnf46NVrfMHkvr/Kx1nTwZTTlSDHD4RZhzp9qiF7X0NNMtTaZoLe9yS+HAXL32ZyaiMC"
    "A4aMLx1LZHXgPMYbbpWiBe21p3mcdGXNfSlq5NLyhG+oWdUea6n/tSvHwuSYSuigZTUuVhsoFaOARJzaPEuurDBp1TEDK1l1XvCC"
    "Dw9e53G93vR5fLjU/N2pjYN2k3tV2zORjjJUFtzaCVxup0D4Ki0pJzMsX4p6BspLqa5pjxhFfrdSFYqya/h6oiK4SNl5mhix0Xfl"
    "/AIhtLIaFKh0ch1QOZ4zYCLjOE+zGrl32IRmZ4PsE/9yyQTw8aFe45vO+QQup0podWrJfYFJ41qobBpJM+ONMgB0MINHgEdCGjSw"
    "ldtnYBv07agi00jAmUbnpmnZoabj+Lel+dejqA2J0vY1NxZ10ay8UkdTl3mNXrP+mqHs00NX+eoayrw6jzcf8vY3eL+rMZACjCp3"
    "Zl4C9FW4kzh9QlWDmVUeuB6jz1XMqQonVJLF0CQprH0tA3otqq3eGrppVcsbVjGld02UVC9zELGmnWoiORTagUkOpC/GrxmxGiWp"
    "wc7afROxA384CJ3347Jn7PNDV9mmJgfEh4pdlt8qxHv1qlUuMm7QYsUTmGWJHJYYAvEImtMDAE3L9zOY3IIQ4FINf5y6HoIFiUet"
    "v4oiiR2pbDX+sjWprUSA/gRVS6o3RtMw46XiEbS2Eg2bBp9Dg3qIREq3sT8lQalNr8Yb94Z6+LKc9codVVbDZZU/z+lMKj6Q2xT8"
    "cSFrqI16GySvnki8gayuZbBRfL0n1B6wtKr3pcoxLiPc/3mcYVPdPVcdiqseq+19zHnvGqU5mzbXoI9O7Ro0SGybTtRyBDhQnpu9"
    "rKy5GBMgB1LrGpS7CZX6CreUrj412qbYmcAgZW1NLEjq7GCVTDJTuoLmz8/zTljlp8AZTsVBuEu1o9b5Ed/rZlga6NoKiELHz2A9"
    "Py2Qbs/Gc2ZeAk+hpOkIR7bwuQpE8TxQ0cy5qL6dJardJLdEN9Ts1mqvQz0oHdgZzrnXUVxy8RnBPHid/3mc4VXYB8WGRtSJy8pz"
    "aiIWDG2pu6UaJPJImi8VlMKrli9NLRi22jfCZJZT3TDk2Rqv0Qxh+1xmTU17g8EUSM5RLjA1FFOdeTZeD/6i4mKI4QVnBPtQr/HP"
    "44ym9guxzUWUGzGpdWznz6fRuUdoXaPy1C654Z1dKSMTZ9SU06uJtXowL569J81gzTYB+DSPA6NAHXgd/WhLh2Yor9EYWPZ2Qo2x"
    "HITHX3fZgnvoKv/zOKNMPxx/+a7el5ompFnWwyM3TK7hs3aOGmQ4UWLlLGtC8YTLVCRpEU8GG4na7OS1aFa214DvqT5eQ3ONBqAt"
    "OavGJE7DO5JGf2vDhDVTwvhllf1DV/mfxxnffYqwj+6vgDkLjlbz7aXh9C0PTa5jgfk679X+wtu4hrJRVc1TlMUfscvLKocvxqR8"
    "t2PIddT4JdJd1Xd+UOemGRK2pBLBpmrGrc6fLNje+ZhB+bZx9Ceyfs6ivtt140xJ/0GV4CHxdnYYq6O1pOoRNRKLRXWzFtofNAOy"
    "VeUo8JsWba7wCfixTuNMu6hE+h+kEvl/u0oE0eUxAIRZc2iKUSmFTco4dCXUCXk4CnbVykKZhlVj/QDXbzF6He1QrQtj4L3UjTnJ"
    "odWiaTk6111dfcKPInbliWjkV4YQElGTajguKgEbCRN9Uu8Gm4gK7yaQowOaEuAacZ94II/qI98X1QC+OGiGprXwzWvDcPyA/lXV"
    "Em7lTGtb6jIZu2t+W/XbaS4N6qK+5erzoeloOs0tSjmtKooBJE3NUXDKVo/qVGx/DJqTVtT74h56YfbKWaesmkNr1ExaM8w2KDwf"
    "8MAedWBVTbW2gfY2ZO9L0/aOBqr9oE+ah9mFjKvmv2qfB8AW89F/XZUmYGvtv9kNJtr84UgYolXQjJLqp6jR3Bf1h7kFmI87ijO9"
    "OplDyfP02iOcaPUohCKN6IVWg7UUmHkklHER0pSrfgir0yzeh/PRLuASaIzHQH0bP+fvUSqW645pA9V1PQqhmPejweho3QnYeEje"
    "ZIMO3uuRDFObUadkVgbExuLgn3rZSicuRpVmO2jsUjzG1hKJNy848JgWRKe+ctrHM60QyqfmnI7cjvxj+DXoUNMnxuxoyNUGDh2O"
    "9gulSLD3njFgqKWmc2BWqg/EJDyrEzWiRj1j5DqdGk5FJUaoYZJ6UmU8sda58ksZz8HfMKCk/ig48ar6FhW+AXHaHGp/F0NXsvc6"
    "Jglr50yvYt4ohftcKYxOPIJ6yrauIVpqYDrBr/NoB8LC1OFXOFKukuq8oX1VG8cgm63KIH81tuQLb99p1jvgBg2HaNtpllHXe40o"
    "7AODaEjYVdizQkqa0ezamK0vfyOs/9I3ELzgjw1xcLfq/jwCatC114dJbz62MBlugFOOaIZV7auGqao8ABO95h9r62XwPGjLUt3n"
    "0kC7mJeMFRMJe2wENY6wl4u2zAfLX2wxu1TU+J/X4dzx3KUTLNBdjazzSijV/KKqVgKE6AJIGwDladR7VYeEDm/0loVy0eHwhQ5b"
    "IGszZWpoLZ4DHySn4ZXNVO1aK8IOoGRR45hcUO2h3TgvfIPyUvylFa3DiEYoqR39UpISY3FhvajJx4hEUNUSoh1xBvWi0BBloAfP"
    "rjRZW2/UIn7t2OzsKi9KoQo8WKNEXAUA5ScqFzsVDc9CYFYbG/dLZxeyOlN3q5cUpmVVUhgcQTFiR4TvqRNWbpg0lAxqJ4oRh1Nv"
    "Pu3+W72UQjSMuIt0I2z6UocxBqsZnawOeovMGjqqVBd+CLGBoPsABudFTm4oVq9BPfiA5cJSf/pLlJya9Yi9CrN1tTa2OoPkdfeu"
    "ND2L1yX4THUgIuDHo+eukr9RKoGXE/aCiqsyIpZ3qdUYpoOhBZWm40AIFFFHS101HkcTl7nVi6Ost5QmgreSWzQ2UeUrhb8i/51Z"
    "MCi5E1Pi9VQitwZziY1AC1W9o6x95y47m5pf/4VizCJ/TojCdECvQFO1Pypz47GEFxTrFsBLzTnSMc56aB5HVuI0XvqwBD/R/am9"
    "rA3VBJ7yIjUiU10nVLOsQAjQAQNpZ9Bv9SUyGUwN4cPB32px+cLgIo8FxAV+r1TUIFtV06ALK7fmZgYIaU+7a3C2+sAnqLGa5mFQ"
    "AK7Ldrfm7iYNPFOWbItL46O3djWmSkvTMZAdlCPVW3hJfKbMTp/eKe0eb0StX+pwTQoQausAUFebZ2UoqPfIgRnrQS4qmAcfZNUV"
    "JGjyxNI8SUA7Du7aP0vDi9VOXjuzAGyAT8o6aVdX5YoyETE1Lb4HdWabGlFs1fXAeY0csWdUqV+uGoohFKRmjqZNBcar1t4upahB"
    "xLE2eZGhXXxvi/ZWa8vCaMoUBPqrhay6b0KI8I1AJIiQWibCgtCRDtSMGRvoW5nMOL9mlcY+8yVrMJkv1CIDJtSqYGl88KhGvbx4"
    "9zqn8ZqNElTLo+EyS+2ksMKu7KOaNa/G2X3ZA1L/JLX9mQg09ahT483itBUGuEbANwAvYPUzVQ2A1VGFfLlGj/Xwc1hdSPZLtcAl"
    "xRG6U2dBJaNa1TxYXKTtmmBOiNaeJu5pqCeIzkR1spNVr0H0nte0sDU37gLSGtH8hY5hAykAIUoDYToNTsc/YLZ4v629emVXxaoG"
    "Ok7zl2/Edb9hGhqjuZK6i+k+3DRYTQHRGwQdaOgbbCVOmXGDKXADPskSr05ku6KJvdTqBCidgF1Gk8vmZQxVXs6Js2heuw7HDN/h"
    "tjOEdsiBJ8KkUcMZgzCuG6jg2ijPpqTUqBOhRLiC9qvhFcgNHI9/Ummb5gRoDnbuTYdNSFbVpyGreTVOUmnShBVVYo+Gj9wgTRUL"
    "GXWKK2jzpfKtYb8Nx3w5L03+N1FvFIu7nqGps1ETr9DcbFE2E3LVAHDupB8TXHPQ7Ijq1YY1TpBofvuWmjR2GyPCG6LwEW8LoIRn"
    "Q1rV17HaSuREbBA+hLpX5YdEtcMBxN8AzfQV+NHWh/dODB1lxNi9wqyzU1EKH3QMPc4aKbqSuqKDJXDIxya1JgrkC4CHX4W40XQe"
    "m0jW5F7aWK7r5J8b4O53VtMT/DZqPLQxrNZFVbz5Vovj15h4QzNwPg7Us3hTHhBU1fMooV9GW4zmaDYmTJ9UfalB5VvdRa02M+yb"
    "Lw4dxqIcxmEiNNYezUJhI00ZxjpbxCnKUvERfLGqH6HVEyKqbvAn+OKujtzVqhBj69xUA0q1/48nABAT/FecboIQCc/HthVrvpX4"
    "orMmY3+cPkJVHUyXyAcw0VxiAmvryYucBJBFxB05vAlh1Ci1tuFefB+Xqo+UvlALopEX7oHAQcHg7AXEGxvesmiUaFMv7HYEp6yJ"
    "UgLuQT0f1aF54fUuGwbVH/k4PABOPaknVQ5KIlGeqIp1VUWoBvxqv0bs0Ikea1W7Ng72vlGL/LUvbmDIPJvqosCQoFlcs8YGYT7o"
    "gavBR51O9ArS0rKKE6vHBQ4P47kyO5CjkK/6hyylZAQ1DUdIZawooVOxGHStuXe9ioeAXpBVx88w0mZuxC1f0NAMW0NGFU8e5Wsz"
    "K7FGjV4mIF0dH3UOZI6pumigA3rzL4QyQ1isb2hP/0KQxsWCShe+tRewI48vUUB1EJOiXovgvcjqqHoeQqQ41DWoqP3zOvzWBEKx"
    "OoQO7o/K0fLaTNP8ZKeZB9EJ2y3Zs1HwqyrUI4qByC46/DV2m3lmzfG2AMUF4gJcJI1GU8fdfDSvwY+u0JREsFfoyiyQkx46qsGr"
    "XLuFVPWy1CwOcKhK/ltN6qzr1yreo8vKXU2SC2Hr0ohGC6h2hH5clQs/FSN/BX+gQsOCDbSD4rXVavDHiJpKH3OH3jP0g9Drokr6"
    "4zHJhJ96hEnq2HIol+uSn/CM1u6JzoIiAKuqbyK0aV3h/RqYmtBYqyJCJXhV7e9Czm4AfLZf6TD22cHuYWiCyUC/WnBbqeSaaes1"
    "DsWq9bv2ePlyNfxU+r3m6VlNz77uTSx8dhsNVKxDXaW864Dcqgd0XwRks4hdXSPQNRSOEHhUIzuUH+58Rv96ghRC8IBKtNSIFY8X"
    "UvUqAdX3ouM1AVzCM37sqFVAIRdIQMNPmoK3Jp5ESdPUbKprTcVss0CfbGKrKTXMeyilAo4L8scfYuYTHnjRYY0/19oSo36Q/GPY"
    "phXs3TrFyE27tRXjkStGrbRJtYKygQiAqtVXHUFl/XkzPhy7apJkJR2KDg1s5/0QsaHMgDoNdiI41DVcs4gaoTVTrV15q3MXsaV1"
    "e1igMeRXu7L7OSUMPyQ8R77jOU+T8DtbD0nbt0nVdJ1gA13UkBXgrmbCaI7bEFZfxKqgOrkE0NJOIHHqMuePqOYNJNTgRVkczROd"
    "l3mcYW1N/Ko1CtgIIalnrEbFlcJtBEcxhIuKAstSSdqRHJjJwAOwEOqKqA9cZ9Kbo8HcAbCu1xtM+VjhpbO5TWj6/92dS27cMBBE"
    "ryR+RJGHyULi5/5HyHuaBF4E8cxiEAziZQDDcbmnWUV2V0FHjjZrRlK3fqe/3xL/DUYpp7s67qfv2dzDQ8+q6bo8mgWqV1ONgIZ+"
    "S8gddIuujHyaY9scbT0SFFHH5b3kyNkK9XW1YBtth6h0TSTo7mVznOSiUfBd0nX6lqHrJz/ugVp5DbXyLtT+k2I7nsCW3wLY/jmw"
    "T62oxrgt5+7t+qwXDLp5oRJb4ecEKjpc1fA4XQPvS+ot7V7DnHq2Ruoy9AyrQoBxpJXmI61VD2d1IPVK1QG11jVyc2wVdnKf2LCt"
    "x+u1aej/APY8PwZ29Gl2hS/5bK33/jnAEVpCZzDpNYf7ockFaVCtW3WtORVIZTecchqIF/Z87XuA2qJx9xZlP/A0nZqil45jehd0"
    "HTrU15roLbGlovfBIyIvG4/+SpNIn9JaHfHph8u4A320QfjmFbL3G2vKguHm7vgnZ5l0vIWEZv2dNd85fVhw8W1cu+b9XnTWaaJq"
    "RDggzKcRB8V4GzO6Y+9n9hV70YW07Y6Ihxs1485fQS1/TLFts6Mjr86Hkg8zR8oGKamd38pJD/QMIuKg2qYKrUKGz6beOzf351Ok"
    "K6Lhp1sZRhnEYUzjQmHRiaMz6oiN5npWCBqcNm/hICRwV/VDq4+xXfPLv4UtcYKDWgoN3Z+QNFVHvK1rF5Hu8HROhvQxoA6OZ7T6"
    "1PmeRndW/RNBp+56ko4+53UcI+ujCdpJGb8urcp9FEjaXd9zu1Qykvw4N9NiDqT3RsHRFvwT0VprMWndiPvMgZXN3qMiF1rgAWp8"
    "1jhNqhx/Avb76xfc8S9wf04NF2BE+3StlPIchXLhFy0N2mDUR1h60GkHuwLVuPuPgFAHPNvbids4ca0eXYR3HmEeYa1YkFRTptYU"
    "k21CMYwLa5EDzYBACJpTvuf1OKfMLX9aw/zpFuTF9WbOU5+0N58uzZ9oztCc9B2QUYou9HMzzCm03XsS2tJmZgWl8HzR9ksvG/T9"
    "fRW86b/1Qi3MJ8zn6x7+x09Bprfr"
)


WYCHEPROOF_FIRST_KEY = ("3059301306072a8648ce3d020106082a8648ce3d03010703420004"
                        "04aaec73635726f213fb8a9e64da3b8632e41495a944d0045b522eba7240fad5"
                        "87d9315798aaa3a5ba01775787ced05eaaf7b4e09fc81d6d1aa546e8365d525d")


def openssl(*args: str, input: bytes | None = None) -> bytes:
    return subprocess.run(["openssl", *args], input=input, capture_output=True, check=True).stdout


class TestSignatures(unittest.TestCase):
    def test_wycheproof_vectors(self) -> None:
        groups = json.loads(zlib.decompress(base64.b64decode("".join(WYCHEPROOF_P256_SHA256))))
        verdicts: dict[bool, int] = {True: 0, False: 0}
        for der, vectors in groups:
            key = dip.public_key_from_der(bytes.fromhex(der), "wycheproof")
            for number, message, signature, valid in vectors:
                with self.subTest(tcId=number):
                    self.assertIs(key.verify(bytes.fromhex(message), bytes.fromhex(signature)), valid)
                verdicts[valid] += 1
        self.assertEqual(verdicts, {True: 174, False: 310})   # numberOfTests: 484

    def test_openssl_signatures(self) -> None:
        if not shutil.which("openssl"):
            self.skipTest("openssl is not installed")
        with tempfile.TemporaryDirectory() as directory:
            keys = [Path(directory, f"{name}.key") for name in ("signer", "other")]
            for path in keys:
                openssl("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", str(path))
            signer, other = (dip.public_key_from_pem(openssl("ec", "-in", str(path), "-pubout").decode(), str(path))
                             for path in keys)
            self.assertNotEqual(signer.fingerprint, other.fingerprint)
            self.assertEqual(signer.fingerprint, "sha256:" + hashlib.sha256(signer.der).hexdigest())
            for size in (0, 1, 100, 70_000):
                message = os.urandom(size)
                signature = openssl("dgst", "-sha256", "-sign", str(keys[0]), input=message)
                with self.subTest(size=size):
                    self.assertTrue(signer.verify(message, signature))
                    self.assertFalse(other.verify(message, signature))
                    self.assertFalse(signer.verify(message + b"\n", signature))
                    self.assertFalse(signer.verify(message, signature + b"\0"))
            compressed = openssl("ec", "-in", str(keys[0]), "-pubout", "-conv_form", "compressed").decode()
            with self.assertRaisesRegex(dip.InvalidKey, "a compressed point; only uncompressed P-256 keys"):
                dip.public_key_from_pem(compressed, "c.pub")
            others: list[tuple[str, list[str]]] = [("RSA", ["-pkeyopt", "rsa_keygen_bits:1024"]), ("ED25519", []),
                                                   ("EC", ["-pkeyopt", "ec_paramgen_curve:secp384r1"])]
            for algorithm, options in others:
                private = openssl("genpkey", "-algorithm", algorithm, *options)
                public = openssl("pkey", "-pubout", input=private).decode()
                with self.subTest(algorithm), self.assertRaisesRegex(dip.InvalidKey, "^not an ECDSA P-256"):
                    dip.public_key_from_pem(public, "k.pub")
            with self.assertRaisesRegex(dip.InvalidKey, r"^a private key; name the public key \(cosign.pub\)"):
                dip.public_key_from_pem(keys[0].read_text(), "k.key")

    def test_strict_keys(self) -> None:
        der = bytes.fromhex(WYCHEPROOF_FIRST_KEY)
        wrapped = base64.encodebytes(der).decode()   # lines of 76, as openssl's are 64
        pem = f"-----BEGIN PUBLIC KEY-----\n{wrapped}-----END PUBLIC KEY-----\n"
        self.assertEqual(dip.public_key_from_pem(pem, "k").der, der)
        self.assertEqual(dip.public_key_from_pem(pem.replace("\n", "\r\n"), "k").der, der)
        for name, text, message in [
            ("two blocks", pem + pem, "not one PEM 'PUBLIC KEY' block"),
            ("text around", "key:\n" + pem, "not one PEM 'PUBLIC KEY' block"),
            ("certificate", pem.replace("PUBLIC KEY", "CERTIFICATE"), r"found CERTIFICATE\)"),
            ("empty", "", "found no PEM block"),
            ("bad base64", pem.replace("MFkw", "MF=w"), "not valid base64"),
            ("point off the curve", "-----BEGIN PUBLIC KEY-----\n"
             + base64.encodebytes(der[:-1] + bytes([der[-1] ^ 1])).decode() + "-----END PUBLIC KEY-----\n",
             "not on the P-256 curve"),
            ("coordinate over p", "-----BEGIN PUBLIC KEY-----\n"
             + base64.encodebytes(der[:-64] + dip.P256_P.to_bytes(32, "big") + der[-32:]).decode() + "-----END PUBLIC KEY-----\n", "not on the P-256 curve"),
            ("trailing byte", "-----BEGIN PUBLIC KEY-----\n" + base64.encodebytes(der + b"\0").decode()
             + "-----END PUBLIC KEY-----\n", "not an ECDSA P-256 public key"),
        ]:
            with self.subTest(name), self.assertRaisesRegex(dip.InvalidKey, message):
                dip.public_key_from_pem(text, "k")

    def test_strict_signatures(self) -> None:
        def sequence(*integers: bytes, length: bytes | None = None) -> bytes:
            content = b"".join(b"\x02" + bytes([len(value)]) + value for value in integers)
            return b"\x30" + (length if length is not None else bytes([len(content)])) + content
        one, big = b"\x01", b"\x00\x80" + b"\x01" * 30
        self.assertEqual(dip.der_signature(sequence(one, big)), (1, int.from_bytes(big, "big")))
        n = dip.P256_N.to_bytes(32, "big")
        for name, signature in [
            ("long-form length", b"\x30\x81" + sequence(one, one)[1:][1:]),
            ("leading zero", sequence(b"\x00\x01", one)),
            ("negative", sequence(b"\x81", one)),
            ("zero", sequence(b"\x00", one)),
            ("empty integer", sequence(b"", one)),
            ("s = n", sequence(one, b"\x00" + n)),
            ("trailing byte", sequence(one, one) + b"\0"),
            ("three integers", sequence(one, one, one)),
            ("length too long", sequence(one, one, length=b"\x07")),
            ("not a sequence", b"\x31" + sequence(one, one)[1:]),
            ("integer 34 bytes", sequence(one, b"\x00" * 2 + n)),
        ]:
            with self.subTest(name):
                self.assertIsNone(dip.der_signature(signature))


# --------------------------------------------------------------------------
# Registry client and cosign signatures
# --------------------------------------------------------------------------

class LocalRegistry:
    """A docker-registry on a free loopback port, written to through its API (no dockerd needed)."""

    def __init__(self, directory: Path) -> None:
        port = free_port()
        self.host = f"localhost:{port}"
        (directory / "registry.yml").write_text(
            f"version: 0.1\nstorage:\n  filesystem:\n    rootdirectory: {directory}/registry\n"
            f"http:\n  addr: 127.0.0.1:{port}\n")
        self.log = open(directory / "registry.log", "ab")
        self.process = subprocess.Popen(["docker-registry", "serve", str(directory / "registry.yml")],
                                        stdout=self.log, stderr=subprocess.STDOUT)

        def up() -> bool:
            with contextlib.suppress(OSError):
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    return True
            return False
        wait_for(up, "the registry")

    def close(self) -> None:
        stop_processes([self.process])
        self.log.close()

    def call(self, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None,
             expect: int = 200) -> tuple[http.client.HTTPResponse, bytes]:
        connection = http.client.HTTPConnection(self.host, timeout=10)
        try:
            connection.request(method, path, body, headers or {})
            response = connection.getresponse()
            answer = response.read()
        finally:
            connection.close()
        if response.status != expect:
            raise AssertionError(f"{method} {path}: HTTP {response.status} {answer[:300]!r}")
        return response, answer

    def push_blob(self, repository: str, content: bytes) -> dict[str, Any]:
        digest = "sha256:" + hashlib.sha256(content).hexdigest()
        response, _ = self.call("POST", f"/v2/{repository}/blobs/uploads/", expect=202)
        location = urlsplit(response.getheader("Location") or "")
        query = f"{location.query}&" if location.query else ""
        self.call("PUT", f"{location.path}?{query}digest={digest}", content,
                  {"Content-Type": "application/octet-stream"}, expect=201)
        return {"mediaType": "application/octet-stream", "digest": digest, "size": len(content)}

    def push_manifest(self, repository: str, name: str, manifest: bytes | dict[str, Any]) -> str:
        content = manifest if isinstance(manifest, bytes) else json.dumps(manifest).encode()
        media_type = json.loads(content)["mediaType"]
        self.call("PUT", f"/v2/{repository}/manifests/{name}", content, {"Content-Type": media_type}, expect=201)
        return "sha256:" + hashlib.sha256(content).hexdigest()

    def push_image(self, repository: str, tag: str) -> str:
        """A small image (a config and one layer) at a tag; its digest."""
        layer = self.push_blob(repository, os.urandom(64))
        layer["mediaType"] = "application/vnd.oci.image.layer.v1.tar"
        config = self.push_blob(repository, json.dumps({
            "architecture": "amd64", "os": "linux", "config": {},
            "rootfs": {"type": "layers", "diff_ids": [layer["digest"]]}}).encode())
        config["mediaType"] = "application/vnd.oci.image.config.v1+json"
        return self.push_manifest(repository, tag, {
            "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": config, "layers": [layer]})

    def manifest(self, repository: str, name: str) -> dict[str, Any]:
        accept = "application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json"
        return json.loads(self.call("GET", f"/v2/{repository}/manifests/{name}", headers={"Accept": accept})[1])

    def blob(self, repository: str, digest: str) -> bytes:
        return self.call("GET", f"/v2/{repository}/blobs/{digest}")[1]


def cosign_tools() -> dict[str, Path]:
    """cosign 2 (Debian trixie, classic .sig) and cosign 3 (sid, Sigstore bundles), downloaded like the engines."""
    if UNIT_ONLY:
        raise Missing("DOCKER_IMAGE_POLICY_UNIT_ONLY=1 asks for the unit tests only")
    if not shutil.which("docker-registry"):
        raise Missing("docker-registry is not installed (apt-get install docker-registry)")
    (trixie,), (sid,) = debian_packages("trixie", ["cosign"]), debian_packages("sid", ["cosign"])
    return {"2": trixie / "usr/bin/cosign", "3": sid / "usr/bin/cosign"}


class StandInRegistryHandler(dip.BaseHTTPRequestHandler):
    """A registry that wants a bearer token from its token service, which wants a password; blobs live elsewhere."""

    routes: dict[str, tuple[int, dict[str, str], bytes]] = {}
    seen: list[tuple[str, str, str]] = []   # (server, path, Authorization)
    server_name = "registry"

    def do_GET(self) -> None:
        authorization = self.headers.get("Authorization", "")
        self.seen.append((self.server_name, self.path, authorization))
        if self.path.startswith("/v2/") and authorization != "Bearer T0K3N":
            realm = f"http://127.0.0.1:{self.server.server_address[1]}/token"
            status, headers, body = 401, {"WWW-Authenticate": f'Bearer realm="{realm}",service="stand-in"'}, b"{}"
        elif self.path.startswith("/token?"):
            good = "Basic " + base64.b64encode(b"robot:s3cret").decode()
            status, headers, body = ((200, {}, b'{"token": "T0K3N", "expires_in": 300}') if authorization == good
                                     else (401, {}, b'{"details": "incorrect username or password"}'))
        else:
            status, headers, body = self.routes.get(self.path, (404, {}, b"{}"))
        self.send_response(status)
        for name, value in {"Content-Length": str(len(body)), **headers}.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


def signed_by(key_file: Path, message: bytes) -> bytes:
    return openssl("dgst", "-sha256", "-sign", str(key_file), input=message)


class TestRegistryClient(unittest.TestCase):
    """The registry client and signature judging against a stand-in registry and openssl's signatures."""

    def setUp(self) -> None:
        StandInRegistryHandler.seen = []
        servers = []
        for name in ("registry", "storage"):
            handler = type(f"{name.title()}Handler", (StandInRegistryHandler,), {"server_name": name})
            server = dip.ThreadingHTTPServer(("127.0.0.1", 0), handler)
            threading.Thread(target=server.serve_forever, daemon=True).start()
            self.addCleanup(server.server_close)
            self.addCleanup(server.shutdown)
            servers.append(server)
        self.host = f"127.0.0.1:{servers[0].server_address[1]}"
        storage = f"http://localhost:{servers[1].server_address[1]}"   # another host: no credentials go there
        self.manifest = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                                    "config": {}, "layers": []}).encode()
        self.digest = "sha256:" + hashlib.sha256(self.manifest).hexdigest()
        self.blob = b"layer content"
        blob_digest = "sha256:" + hashlib.sha256(self.blob).hexdigest()
        oci = {"Content-Type": "application/vnd.oci.image.manifest.v1+json"}
        StandInRegistryHandler.routes = {
            "/v2/team/app/manifests/v1": (200, oci, self.manifest),
            f"/v2/team/app/manifests/{self.digest}": (200, oci, self.manifest),
            f"/v2/team/app/manifests/{DIGEST}": (200, oci, self.manifest),   # content that is not DIGEST's
            f"/v2/team/app/blobs/{blob_digest}": (307, {"Location": f"{storage}/b?signature=x"}, b""),
            "/b?signature=x": (200, {}, self.blob),
            f"/v2/team/app/blobs/{DIGEST}": (200, {}, b"x" * (dip.MAX_SIGNATURE_BLOB + 1)),
            "/v2/team/app/blobs/sha256:" + "b" * 64: (200, {}, self.blob),
            "/v2/team/app/blobs/sha256:" + "c" * 64: (302, {"Location": "file:///etc/passwd"}, b""),
            "/v2/team/app/blobs/sha256:" + "d" * 64: (302, {"Location": "/v2/team/app/blobs/sha256:" + "d" * 64}, b""),
        }
        self.blob_digest = blob_digest
        self.credentials = MappingProxyType({self.host: ("robot", "s3cret")})
        self.reference = parse_reference(f"{self.host}/team/app:v1")

    def client(self, credentials: bool = True) -> dip.RegistryClient:
        return dip.RegistryClient(credentials=self.credentials if credentials else MappingProxyType({}))

    def test_token_flow_digests_and_redirects(self) -> None:
        client = self.client()
        self.assertEqual(dip.resolve_tag(client, self.reference), self.digest)
        self.assertEqual(getattr(client.manifest(self.reference, self.digest), "content", None), self.manifest)
        self.assertEqual(client.blob(self.reference, self.blob_digest), self.blob)
        tokens = [path for server, path, _ in StandInRegistryHandler.seen if path.startswith("/token")]
        self.assertEqual(tokens, ["/token?service=stand-in&scope=repository%3Ateam%2Fapp%3Apull"])   # asked once
        storage = [authorization for server, _, authorization in StandInRegistryHandler.seen if server == "storage"]
        self.assertEqual(storage, [""])   # the redirect to another host carried no credentials

    def test_refusals_never_show_credentials(self) -> None:
        client = self.client()
        messages = []
        for action, message in [
            (lambda: client.manifest(self.reference, DIGEST), f"answered team/app@{DIGEST} with other content"),
            (lambda: client.blob(self.reference, DIGEST), f"with more than {dip.MAX_SIGNATURE_BLOB} bytes"),
            (lambda: client.blob(self.reference, "sha256:" + "b" * 64), "with other content"),
            (lambda: client.blob(self.reference, "sha256:" + "c" * 64), "where the plugin will not follow"),
            (lambda: client.blob(self.reference, "sha256:" + "d" * 64), f"more than {dip.MAX_REDIRECTS} redirects"),
            (lambda: client.blob(self.reference, "sha256:" + "e" * 64), "has no blob"),
            (lambda: self.client(credentials=False).manifest(self.reference, "v1"),
             r"the token service of 127.0.0.1:\d+ gave no token \(HTTP 401\)"),
        ]:
            with self.subTest(message), self.assertRaisesRegex(dip.RegistryError, message) as caught:
                action()
            messages.append(str(caught.exception))
        self.assertFalse([m for m in messages if "s3cret" in m or "T0K3N" in m or "cm9ib3Q" in m])

    def test_unreachable_registry(self) -> None:
        reference = parse_reference(f"127.0.0.1:{free_port()}/team/app@{self.digest}")
        with self.assertRaisesRegex(dip.RegistryUnreachable, "Connection refused"):
            dip.resolve_tag(self.client(), dataclasses.replace(reference, digest=None, tag="v1"))
        verdict = dip.verify_image(self.client(), reference, (openssl_key(self)[1],))
        self.assertEqual(verdict, dip.SignatureVerdict(False, f"registry unreachable: {reference.domain}: Connection refused"))
        self.assertIsNone(self.client().verdicts.get(reference))   # never remembered

    def test_docker_hub_mirrors_first(self) -> None:
        settings = dip.RegistrySettings.from_info({"RegistryConfig": {
            "Mirrors": [f"http://127.0.0.1:{free_port()}", f"http://{self.host}"], "IndexConfigs": {},
            "InsecureRegistryCIDRs": ["127.0.0.0/8"]}})
        client = dip.RegistryClient(settings, MappingProxyType({"docker.io": ("robot", "s3cret")}))
        self.assertEqual(dip.resolve_tag(client, parse_reference("team/app:v1")), self.digest)   # the second mirror
        with self.assertRaisesRegex(dip.ImagePolicyError, "a mirror that is not an HTTP\\(S\\) URL"):
            dip.RegistrySettings.from_info({"RegistryConfig": {"Mirrors": ["mirror.example.com"]}})

    def test_bundles_found_through_the_referrers_api(self) -> None:
        key_file, key = openssl_key(self)
        reference = dataclasses.replace(self.reference, tag=None, digest=self.digest)
        statement = json.dumps({"_type": "https://in-toto.io/Statement/v1", "subject": [
            {"digest": {"sha256": self.digest[7:]}}], "predicateType": "https://sigstore.dev/cosign/sign/v1",
            "predicate": {}}).encode()
        signature = signed_by(key_file, dip._dsse_message("application/vnd.in-toto+json", statement))
        bundle = json.dumps({"mediaType": "application/vnd.dev.sigstore.bundle.v0.3+json", "dsseEnvelope": {
            "payloadType": "application/vnd.in-toto+json", "payload": base64.b64encode(statement).decode(),
            "signatures": [{"sig": base64.b64encode(signature).decode()}]}}).encode()
        bundle_digest = "sha256:" + hashlib.sha256(bundle).hexdigest()
        manifest = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                               "layers": [{"mediaType": "application/vnd.dev.sigstore.bundle.v0.3+json",
                                           "digest": bundle_digest, "size": len(bundle)}]}).encode()
        manifest_digest = "sha256:" + hashlib.sha256(manifest).hexdigest()
        sbom = json.dumps({"layers": [{"mediaType": "application/spdx+json", "digest": DIGEST}]}).encode()
        sbom_digest = "sha256:" + hashlib.sha256(sbom).hexdigest()
        index = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": [
            {"digest": sbom_digest}, {"digest": manifest_digest}]}).encode()
        StandInRegistryHandler.routes.update({
            f"/v2/team/app/referrers/{self.digest}": (200, {}, index),
            f"/v2/team/app/manifests/{manifest_digest}": (200, {}, manifest),
            f"/v2/team/app/manifests/{sbom_digest}": (200, {}, sbom),
            f"/v2/team/app/blobs/{bundle_digest}": (200, {}, bundle)})
        self.assertEqual(dip.verify_image(self.client(), reference, (key,)),
                         dip.SignatureVerdict(True, "signed (sigstore bundle)"))
        for status in (400, 404):   # no referrers API: the fallback tag, here absent
            StandInRegistryHandler.routes[f"/v2/team/app/referrers/{self.digest}"] = (status, {}, b"{}")
            with self.subTest(status=status):
                self.assertEqual(dip.verify_image(self.client(), reference, (key,)),
                                 dip.SignatureVerdict(False, dip.NO_SIGNATURE))
        StandInRegistryHandler.routes[f"/v2/team/app/referrers/{self.digest}"] = (500, {}, b"{}")
        self.assertEqual(dip.verify_image(self.client(), reference, (key,)), dip.SignatureVerdict(
            False, f"registry answer unusable: {self.host} answered GET /v2/team/app/referrers/{self.digest} with HTTP 500"))

    def test_unusable_signature_manifests(self) -> None:
        reference = dataclasses.replace(self.reference, tag=None, digest=self.digest)
        keys = (openssl_key(self)[1],)
        signature_tag = f"/v2/team/app/manifests/{self.digest.replace(':', '-')}.sig"
        sha512 = json.dumps({"mediaType": "application/vnd.oci.image.manifest.v1+json", "layers": [
            {"digest": "sha512:" + "a" * 128, "annotations": {dip.COSIGN_SIGNATURE_ANNOTATION: "x"}}]}).encode()
        for name, body, reason in [
            ("deep nesting", b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
            ("a sha512 layer", sha512, "descriptors without a sha256 digest"),
            ("not an object", b"[]", "not an object"),
        ]:
            StandInRegistryHandler.routes[signature_tag] = (200, {}, body)
            with self.subTest(name):
                verdict = dip.verify_image(self.client(), reference, keys)
                self.assertFalse(verdict.ok)
                self.assertRegex(verdict.reason, f"^registry answer unusable: 127.0.0.1:\\d+ has an unreadable manifest "
                                                 f"sha256:[0-9a-f]{{64}} in team/app: {reason}$")

    def test_insecure_registries_as_dockerd_decides(self) -> None:
        default = dip.RegistrySettings()
        for domain, insecure in [("localhost:5000", True), ("127.0.0.2", True), ("[::1]:5000", True),
                                 ("10.0.0.1:5000", False), ("registry.invalid", False)]:
            with self.subTest(domain):
                self.assertIs(default.insecure(domain), insecure)
        settings = dip.RegistrySettings.from_info({"RegistryConfig": {
            "InsecureRegistryCIDRs": ["10.0.0.0/8"],
            "IndexConfigs": {"docker.io": {"Name": "docker.io", "Secure": True, "Mirrors": []},
                             "registry.invalid:5000": {"Secure": False}, "localhost:5000": {"Secure": True}}}})
        for domain, insecure in [("10.0.0.1:5000", True), ("registry.invalid:5000", True), ("registry.invalid", False),
                                 ("localhost:5000", False), ("127.0.0.1", False), ("docker.io", False)]:
            with self.subTest(domain):
                self.assertIs(settings.insecure(domain), insecure)
        with self.assertRaisesRegex(dip.ImagePolicyError, "unexpected RegistryConfig from the Docker API"):
            dip.RegistrySettings.from_info({"RegistryConfig": {"InsecureRegistryCIDRs": ["not a network"]}})

    def test_credentials_file(self) -> None:
        with tempfile.TemporaryDirectory() as directory:
            path = Path(directory, "config.json")
            auth = base64.b64encode(b"robot:pass:word").decode()
            path.write_text(json.dumps({"auths": {"https://index.docker.io/v1/": {"auth": auth},
                                                  "Registry.Example.com:5000": {"username": "u", "password": "p"}}}))
            self.assertEqual(dict(dip.load_credentials(str(path))),
                             {"docker.io": ("robot", "pass:word"), "registry.example.com:5000": ("u", "p")})
            for document, message in [
                ({"credsStore": "desktop"}, "credsStore: credential helpers are not run by the plugin"),
                ({"auths": {"r.example": {"identitytoken": "x"}}}, "auths.r.example: identity tokens are not supported"),
                ({"auths": {"r.example": {"auth": "bm9jb2xvbg=="}}}, r"auths.r.example.auth: not base64 of user:password"),
                ({"auths": {"r.example": {"auth": "%%%"}}}, r"auths.r.example.auth: not base64 of user:password"),
                ({"auths": {"r.example": {"username": "u"}}}, "auths.r.example: expected auth, or username and password"),
                ({"auths": []}, "auths: expected an object of registries"),
            ]:
                path.write_text(json.dumps(document))
                with self.subTest(message), self.assertRaisesRegex(dip.ConfigError, f"^{re.escape(str(path))}: {message}"):
                    dip.load_credentials(str(path))
            path.write_text('{"auths": {}, "auths": {}}')
            with self.assertRaisesRegex(dip.ConfigError, "key auths: appears twice"):
                dip.load_credentials(str(path))
            with self.assertRaisesRegex(dip.ConfigError, "cannot read the registry credentials: No such file"):
                dip.load_credentials(directory + "/absent.json")

    def test_public_key_files(self) -> None:
        key_file, key = openssl_key(self)
        public = Path(key_file.parent, "k.pub")
        public.write_text(openssl("ec", "-in", str(key_file), "-pubout").decode())
        self.assertEqual([loaded.der for loaded in dip.load_public_keys([str(public), str(public)])], [key.der])
        for path, message in [(str(key_file), "a private key; name the public key"),
                              (str(public) + ".absent", "cannot read the public key: No such file")]:
            with self.subTest(path), self.assertRaisesRegex(dip.ConfigError, f"^{re.escape(path)}: {message}"):
                dip.load_public_keys([path])

    def test_payloads_read_as_cosign_reads_them(self) -> None:
        key_file, key = openssl_key(self)
        digest = self.digest
        simple = '{"critical":{"identity":{"docker-reference":"x"},"image":{"docker-manifest-digest":"%s"},' \
                 '"type":"cosign container image signature"},"optional":null}'
        for name, text, failure in [
            ("simple signing", simple % digest, ""),
            ("another digest", simple % DIGEST, dip.OTHER_DIGEST),
            ("Go folds key case", simple.replace('"critical"', '"CRITICAL"') % digest, ""),
            ("two spellings", '{"critical":{"image":{"docker-manifest-digest":"%s"}},"Critical":{}}' % digest,
             dip.TAMPERED),
            ("a duplicate key", '{"critical":{"image":{"docker-manifest-digest":"%s"}},"critical":{}}' % digest,
             dip.TAMPERED),
            ("not JSON", "signed text", dip.TAMPERED),
            ("no digest", '{"critical":{"image":{}}}', dip.TAMPERED),
        ]:
            message = text.encode()
            signature = dip.CosignSignature("cosign signature", message, signed_by(key_file, message), "",
                                            functools.partial(dip._simple_signing_digests, message))
            with self.subTest(name):
                self.assertEqual(dip.judge_signature(signature, digest, (key,)), failure)
        statement: dict[str, Any] = {"_type": "https://in-toto.io/Statement/v1", "predicateType": "https://sigstore.dev/cosign/sign/v1",
                     "subject": [{"digest": {"sha256": DIGEST[7:]}}, {"digest": {"sha256": digest[7:]}}], "predicate": {}}
        hint = base64.b64encode(hashlib.sha256(key.der).digest()).decode()
        for name, document, failure in [
            ("in-toto", statement, ""),
            ("another digest", {**statement, "subject": statement["subject"][:1]}, dip.OTHER_DIGEST),
            ("not a statement", {**statement, "_type": "https://example.com/x"}, dip.TAMPERED),
        ]:
            payload = json.dumps(document).encode()
            envelope = {"payloadType": "application/vnd.in-toto+json", "payload": base64.b64encode(payload).decode(),
                        "signatures": [{"sig": base64.b64encode(signed_by(key_file, dip._dsse_message(
                            "application/vnd.in-toto+json", payload))).decode()}]}
            bundle = json.dumps({"mediaType": "application/vnd.dev.sigstore.bundle.v0.3+json",
                                 "verificationMaterial": {"publicKey": {"hint": hint}}, "dsseEnvelope": envelope})
            (signature,) = dip._bundle_signatures(bundle.encode())
            with self.subTest(name):
                self.assertEqual(dip.judge_signature(signature, digest, (key,)), failure)
        other = dip.public_key_from_der(bytes.fromhex(WYCHEPROOF_FIRST_KEY), "other")
        self.assertEqual(dip.judge_signature(signature, digest, (other,)), dip.OTHER_KEY)
        altered = dataclasses.replace(signature, message=signature.message + b" ")
        self.assertEqual(dip.judge_signature(altered, digest, (key,)), dip.TAMPERED)
        self.assertEqual(dip.judge_signature(dataclasses.replace(altered, key_hint=""), digest, (key,)),
                         dip.OTHER_KEY_OR_TAMPERED)
        (unreadable,) = dip._bundle_signatures(b'{"dsseEnvelope": {"payloadType": "text/plain"}}')
        self.assertEqual(dip.judge_signature(unreadable, digest, (key,)), dip.TAMPERED)

    def test_verdicts_remembered(self) -> None:
        memory = dip.VerdictMemory(entries=2)
        verdicts = [dip.SignatureVerdict(n % 2 == 0, str(n)) for n in range(3)]
        memory.put("a", verdicts[0], None)
        memory.put("b", verdicts[1], 0.0)   # a negative verdict that has already expired
        self.assertEqual((memory.get("a"), memory.get("b")), (verdicts[0], None))
        memory.put("c", verdicts[2], None)
        self.assertEqual((memory.get("a"), memory.get("c")), (None, verdicts[2]))   # the oldest forgotten
        client = self.client()
        reference = dataclasses.replace(self.reference, tag=None, digest=self.digest)
        keys = (openssl_key(self)[1],)
        self.assertEqual(dip.verify_image(client, reference, keys), dip.SignatureVerdict(False, dip.NO_SIGNATURE))
        asked = len(StandInRegistryHandler.seen)
        self.assertEqual(dip.verify_image(client, reference, keys), dip.SignatureVerdict(False, dip.NO_SIGNATURE))
        self.assertEqual(len(StandInRegistryHandler.seen), asked)   # from memory, for NEGATIVE_VERDICT_SECONDS
        with self.assertRaisesRegex(dip.ImagePolicyError, "needs a sha256 digest and a key"):
            dip.verify_image(client, self.reference, keys)


class DaemonInfo:
    """GET /info of a daemon with the default registry settings and the image store the test names."""

    def __init__(self, containerd: bool) -> None:
        self.containerd = containerd

    def get(self, path: str) -> dict[str, Any]:
        assert path == "/info", path
        return {"RegistryConfig": {"InsecureRegistryCIDRs": ["::1/128", "127.0.0.0/8"]}, "DriverStatus": [dip.CONTAINERD_STORE] if self.containerd else [["Backing", "x"]]}


class NeverAsked(dip.Signatures):
    """Signatures a decision must not need: asking them fails the test."""

    def check(self, reference: dip.Reference, keys: tuple[dip.PublicKey, ...]) -> dip.SignatureVerdict:
        raise AssertionError(f"a signature check of {reference.canonical}")

    def of_image(self, local: dip.LocalImage) -> dip.Signatures:
        return self


class TestSignedScopes(unittest.TestCase):
    """signedBy: pulls by digest and tag checked at a stand-in registry, images present by the digest they were
    pulled by, in both image stores; policy tests judge offline; other scopes pay nothing."""

    def setUp(self) -> None:
        TestRegistryClient.setUp(self)   # type: ignore[arg-type]   # the stand-in registry and its token service
        self.key_file, _ = openssl_key(self)
        self.other_file, _ = openssl_key(self)
        self.directory = self.key_file.parent
        for name, private in (("release.pub", self.key_file), ("other.pub", self.other_file)):
            (self.directory / name).write_bytes(openssl("ec", "-in", str(private), "-pubout"))
        oci = {"Content-Type": "application/vnd.oci.image.manifest.v1+json"}
        self.images = {}
        for tag in ("v1", "v2", "v3"):   # v1 signed by the release key, v2 by none, v3 by another key
            config = json.dumps({"tag": tag}).encode()
            manifest = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                                   "config": {"digest": "sha256:" + hashlib.sha256(config).hexdigest()},
                                   "layers": []}).encode()
            digest = "sha256:" + hashlib.sha256(manifest).hexdigest()
            StandInRegistryHandler.routes.update({f"/v2/team/app/manifests/{tag}": (200, oci, manifest),
                                                  f"/v2/team/app/manifests/{digest}": (200, oci, manifest)})
            self.images[tag] = (digest, "sha256:" + hashlib.sha256(config).hexdigest())
        index = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
                            "manifests": [{"digest": self.images["v2"][0]}, {"digest": self.images["v1"][0]}]}).encode()
        self.index = "sha256:" + hashlib.sha256(index).hexdigest()
        StandInRegistryHandler.routes[f"/v2/team/app/manifests/{self.index}"] = (200, {}, index)
        self.sign(self.images["v1"][0], self.key_file)
        self.sign(self.images["v3"][0], self.other_file)
        self.sign(self.index, self.key_file)
        self.repository = f"{self.host}/team/app"
        self.policy = self.signed_policy({"allow": f"{self.host}/team", "signedBy": ["release.pub"]},
                                         {"allow": f"{self.host}/team", "tags": ["dev-*"]}, {"allow": "docker.io"})

    def sign(self, digest: str, key_file: Path) -> None:
        """A cosign 2 signature (tag sha256-<hex>.sig) of digest by key_file."""
        payload = json.dumps({"critical": {"identity": {"docker-reference": f"{self.host}/team/app"},
                                           "image": {"docker-manifest-digest": digest},
                                           "type": "cosign container image signature"}, "optional": None}).encode()
        payload_digest = "sha256:" + hashlib.sha256(payload).hexdigest()
        signature = base64.b64encode(signed_by(key_file, payload)).decode()
        manifest = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                               "layers": [{"digest": payload_digest, "size": len(payload),
                                           "annotations": {dip.COSIGN_SIGNATURE_ANNOTATION: signature}}]}).encode()
        StandInRegistryHandler.routes.update({
            f"/v2/team/app/manifests/{digest.replace(':', '-')}.sig": (200, {}, manifest),
            f"/v2/team/app/blobs/{payload_digest}": (200, {}, payload)})

    def signed_policy(self, *entries: dict[str, Any], **settings: Any) -> dip.Policy:
        path = self.directory / "policy.json"
        path.write_text(json.dumps({"scopes": list(entries), "defaultAllow": False, **settings}))
        return dip.load_policy(str(path))

    def registry(self, containerd: bool = False) -> dip.RegistrySignatures:
        return dip.RegistrySignatures(DaemonInfo(containerd), self.credentials)   # type: ignore[arg-type]

    def decide(self, request: dict[str, Any], docker: dip.Docker = NO_DOCKER, containerd: bool = False,
               policy: dip.Policy | None = None) -> dip.Decision:
        """The decision, made without the plugin's catch-all: an internal error fails the test."""
        return dip.decide((policy or self.policy).judged_with(self.registry(containerd)), request, docker)

    def run_of(self, name: str) -> dict[str, Any]:
        return authz("POST", "/v1.41/containers/create", {"Image": name})

    def test_signed_by_is_read_at_load(self) -> None:
        entry = self.policy.scopes.entries[0]
        self.assertEqual((entry.signed_by, len(entry.keys)), (("release.pub",), 1))
        self.assertTrue(self.policy.scopes.signed)
        self.assertEqual(self.policy.configuration()["scopes"][0],
                         {"allow": f"{self.host}/team", "signedBy": ["release.pub"]})
        (self.directory / "bad.pub").write_text("-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n")
        for entry, problem in [
            ({"deny": "quay.io/evil", "signedBy": ["release.pub"]}, '"signedBy" is a condition of allow entries'),
            ({"allow": "quay.io", "signedBy": []}, '"signedBy" lists no key'),
            ({"allow": "quay.io", "signedBy": ["absent.pub"]},
             f'signedBy "{self.directory}/absent.pub": cannot read the public key: No such file or directory'),
            ({"allow": "quay.io", "signedBy": ["bad.pub"]}, f'signedBy "{self.directory}/bad.pub": '),
            ({"allow": "quay.io", "signedby": "release.pub"}, "must be a list"),
        ]:
            with self.subTest(problem), self.assertRaises(dip.ConfigError) as caught:
                self.signed_policy(entry)
            self.assertIn(problem, str(caught.exception))
            if "signedBy" in problem:
                self.assertTrue(str(caught.exception).startswith(f'{self.directory}/policy.json: "scopes"[0]: '))
        self.assertFalse(policy_of({"scopes": [{"allow": "quay.io"}]}).scopes.signed)

    def test_pulls_by_digest_and_by_tag(self) -> None:
        v1, v2, v3 = (self.images[tag][0] for tag in ("v1", "v2", "v3"))
        for name, allow, reason in [
            (f"{self.repository}@{v1}", True, f"matches: signed (cosign signature) ({v1})"),
            (f"{self.repository}:v1", True, f"matches: signed (cosign signature) (tag v1 is {v1})"),
            (f"{self.repository}:v9@{v1}", True, f"({v1})"),
            (f"{self.repository}:dev-1", True, "scopes[1]"),   # another entry allows: no signature needed
            (f"{self.repository}@{v2}", False, f"scopes[0] needs a signature by release.pub: no signature ({v2})"),
            (f"{self.repository}:v2", False, f"no signature (tag v2 is {v2})"),
            (f"{self.repository}:v3", False, f"{dip.OTHER_KEY_OR_TAMPERED} (tag v3 is {v3})"),
            (f"{self.repository}:v4", False, f"{self.repository}:v4 not found at the registry"),
            (f"{self.repository}@{self.index}", True, f"({self.index})"),
        ]:
            with self.subTest(name):
                decision = self.decide(pull(f"/v1.41/images/create?fromImage={quote(name, safe='')}"))
                self.assertEqual(decision.allow, allow, decision.reason)
                self.assertIn(reason, decision.reason if reason != "scopes[1]" else decision.rule)
                if not allow:
                    self.assertRegex(decision.reason, rf'^scope "{re.escape(self.host)}/team" governs it and no'
                                                      r" entry there allows it \(scopes\[1\] is for tags dev-\*.*;"
                                                      r" scopes\[0\] needs a signature by release.pub: ")
        all_tags = self.decide(pull(f"/v1.41/images/create?fromImage={quote(self.repository, safe='')}"))
        self.assertFalse(all_tags.allow)
        self.assertIn("needs a signature by release.pub: a signature covers one digest and a pull of all tags",
                      all_tags.reason)
        unreachable = dataclasses.replace(parse_reference(f"127.0.0.1:{free_port()}/team/app:v1"))
        policy = self.signed_policy({"allow": unreachable.domain, "signedBy": [str(self.directory / "release.pub")]})
        decision = self.decide(pull(f"/v1.41/images/create?fromImage={quote(unreachable.familiar, safe='')}"),
                               policy=policy)
        self.assertFalse(decision.allow)
        self.assertIn("needs a signature by", decision.reason)
        self.assertIn("registry unreachable: ", decision.reason)

    def test_other_scopes_and_unsigned_entries_never_ask(self) -> None:
        policy = self.policy.judged_with(NeverAsked())
        dev = f"{self.repository}:dev-3"   # a run in a signed scope looks the image up, but needs no signature
        docker = FakeDocker({dev: [dip.LocalImage("sha256:" + "d" * 64, (dev,))]})
        for request, allow in [(pull("/v1.41/images/create?fromImage=nginx&tag=1"), True),
                               (pull(f"/v1.41/images/create?fromImage={self.repository}&tag=dev-3"), True),
                               (pull("/v1.41/images/create?fromImage=quay.io%2Fx&tag=1"), False),
                               (self.run_of("nginx:1"), True), (self.run_of(f"{self.repository}:dev-3"), True)]:
            with self.subTest(request["RequestUri"]):
                self.assertEqual(dip.decide(policy, request, docker).allow, allow)
        unsigned = policy_of({"scopes": [{"allow": "docker.io"}]})
        self.assertIs(unsigned.judged_with(NeverAsked()), unsigned)   # nothing changes for policies without signedBy

    def test_another_spelling_of_a_signed_repository_is_judged_by_the_image(self) -> None:
        host, port = self.host.rsplit(":", 1)
        other = f"{host}:0{port}/team/app:v1"   # the same registry: Go reads 0PORT as PORT
        policy = self.signed_policy({"allow": f"{self.host}/team", "signedBy": ["release.pub"]}, defaultAllow=True)
        unsigned = dip.LocalImage("sha256:" + "e" * 64, (other,))
        docker = FakeDocker({other: [unsigned], unsigned.id: [unsigned]})
        for request in (self.run_of(other), authz("POST", f"/v1.41/images/{unsigned.id}/tag?repo={quote(other, safe='')}"),
                        authz("POST", "/v1.41/containers/create", {"Image": "nginx:1", "HostConfig": {
                            "Mounts": [{"Type": "image", "Source": other}]}})):
            with self.subTest(request["RequestUri"]):
                decision = self.decide(request, docker, policy=policy)
                self.assertFalse(decision.allow, decision.reason)
                self.assertIn(f"was not pulled from {self.host}/team/app", decision.reason)
                self.assertIn("the same repository under its usual name", decision.reason)
        service = self.decide(authz("POST", "/v1.41/services/create", {"TaskTemplate": {"ContainerSpec": {
            "Image": other}}}), policy=policy)
        self.assertFalse(service.allow)
        self.assertIn("a swarm worker resolves a service's tag itself", service.reason)
        # Pulled under the usual name (its digest recorded there), the image runs under either spelling.
        v1, config1 = self.images["v1"]
        pulled = dip.LocalImage(config1, (other, f"{self.repository}@{v1}"))
        decision = self.decide(self.run_of(other), FakeDocker({other: [pulled], pulled.id: [pulled]}), policy=policy)
        self.assertTrue(decision.allow, decision.reason)

    def test_image_mounts_are_judged_once_each_up_to_a_bound(self) -> None:
        policy = policy_of({"defaultAllow": False, "whitelist": ["^nginx:"]})
        mounts = [{"Type": "image", "Source": f"nginx:{index % 3}"} for index in range(1000)]
        decision = dip.decide(policy, authz("POST", "/v1.41/containers/create", {"Image": "nginx:1", "HostConfig": {
            "Mounts": mounts}}), NO_DOCKER)
        self.assertTrue(decision.allow, decision.reason)   # three images, each judged once
        many = [{"Type": "image", "Source": f"nginx:{index}"} for index in range(dip.MAX_IMAGE_MOUNTS + 1)]
        decision = dip.decide(policy, authz("POST", "/v1.41/containers/create", {"Image": "nginx:1", "HostConfig": {
            "Mounts": many}}), NO_DOCKER)
        self.assertEqual((decision.allow, decision.rule), (False, "unreadable"))
        self.assertIn(f"{dip.MAX_IMAGE_MOUNTS + 1} different images mounted, more than any container needs",
                      decision.reason)
        # The first denial ends the decision: no image after it is looked up on the daemon.
        docker = FakeDocker({"cafe": []})
        decision = dip.decide(policy, authz("POST", "/v1.41/containers/create", {"Image": "redis:7", "HostConfig": {
            "Mounts": [{"Type": "image", "Source": "cafe"}]}}), docker)
        self.assertFalse(decision.allow)
        self.assertEqual(docker.looked_up, [])

    def test_images_present_by_the_digest_they_were_pulled_by(self) -> None:
        (v1, config1), (v2, config2) = self.images["v1"], self.images["v2"]
        name = f"{self.repository}:v1"
        pulled = dip.LocalImage(config1, (name, f"{self.repository}@{v1}"))
        for store, local, allow, reason in [
            ("classic", pulled, True, f"signed (cosign signature) ({v1}, the digest image {config1[7:19]} was"
                                      " pulled by)"),
            ("classic", dip.LocalImage(config1, (name, f"{self.repository}@{self.index}")), True, self.index),
            ("classic", dip.LocalImage(config2, (name, f"{self.repository}@{self.index}")), True, self.index),
            ("classic", dip.LocalImage(config2, (name, f"{self.repository}@{v1}")), False,
             f"image {config2[7:19]} is not the content of {v1}, the signed digest it records"),
            ("classic", dip.LocalImage(config2, (name, f"{self.repository}@{v2}")), False, f"no signature ({v2}"),
            ("classic", dip.LocalImage(config1, (name,)), False, f"was not pulled from {self.repository}"),
            ("classic", dip.LocalImage(config1, (name, f"{self.host}/other/app@{v1}")), False, "was not pulled"),
            ("containerd", dip.LocalImage(v1, (name, f"{self.repository}@{v1}")), True, f"({v1}, the digest"),
            ("containerd", dip.LocalImage(self.index, (name, f"{self.repository}@{self.index}")), True, self.index),
            ("containerd", dip.LocalImage(config1, (name, f"{self.repository}@{v1}")), False, "is not the content"),
        ]:
            with self.subTest(store=store, local=local):
                docker = FakeDocker({name: [local], local.id: [local]})
                for request in (self.run_of(name), self.run_of(local.id),
                                authz("POST", "/v1.41/containers/create", {"Image": "nginx:1", "HostConfig": {
                                    "Mounts": [{"Type": "image", "Source": name}]}}),
                                authz("POST", f"/v1.41/images/{local.id}/tag?repo={quote(name, safe='')}")):
                    decision = self.decide(request, docker, containerd=store == "containerd")
                    self.assertEqual(decision.allow, allow, decision.reason)
                    if decision.image != "docker.io/library/nginx:1":   # an allowed image mount: the run's reason
                        self.assertIn(reason, decision.reason)
        # What --scan reads to name an exception: the entry that allowed it.
        decision = self.decide(self.run_of(name), FakeDocker({name: [pulled]}))
        self.assertIs(decision.decided_by, self.policy.scopes.entries[0])
        built = dip.LocalImage("sha256:" + "b" * 64, ("built:1",))
        decision = self.decide(authz("POST", f"/v1.41/images/built:1/tag?repo={quote(self.repository, safe='')}"
                                             "&tag=v1"), FakeDocker({"built:1": [built]}),
                               policy=self.signed_policy(self.policy.configuration()["scopes"][0],
                                                         {"allow": "docker.io"}))
        self.assertEqual((decision.allow, decision.operation), (False, dip.TAG))
        self.assertIn(f"image {'b' * 12} was not pulled from {self.repository}", decision.reason)
        absent = self.decide(self.run_of(name), FakeDocker({name: []}))
        self.assertFalse(absent.allow)
        self.assertIn("no such image on this host: pull it first", absent.reason)
        # A swarm task pulls the name itself: judged at the registry, as a pull is.
        service = self.decide(authz("POST", "/v1.41/services/create", {"TaskTemplate": {"ContainerSpec": {
            "Image": f"{self.repository}:v1@{v1}"}}}))
        self.assertEqual((service.allow, service.operation), (True, dip.SERVICE), service.reason)
        unpinned = self.decide(authz("POST", "/v1.41/services/create", {"TaskTemplate": {"ContainerSpec": {
            "Image": name}}}))
        self.assertFalse(unpinned.allow)
        self.assertIn("a swarm worker resolves a service's tag itself", unpinned.reason)

    def test_registry_decisions_are_not_remembered_by_request_body(self) -> None:
        config = self.directory / "policy.json"
        config.write_text(json.dumps({"scopes": [{"allow": f"{self.host}/team", "signedBy": ["release.pub"]},
                                                 {"allow": "docker.io"}]}))
        plugin = dip.Plugin(str(config), dip.load_tested_policy,
                            dip.Log("info", io.StringIO()), dip.DockerAPI("unix:///nonexistent"),
                            signatures=self.registry())
        signed = json.dumps(pull(f"/v1.41/images/create?fromImage={quote(self.repository, safe='')}&tag=v1")).encode()
        unsigned_scope = json.dumps(pull("/v1.41/images/create?fromImage=nginx&tag=1")).encode()
        self.assertEqual(plugin.decide(plugin.policy, signed)[0].allow, True)
        self.assertEqual([plugin.decide(plugin.policy, body)[1] for body in (signed, unsigned_scope)], [False, True])
        for _ in range(2):
            self.assertIn(b'"Allow": true', plugin.authorize(signed))
        self.assertNotIn(signed, plugin.current.answers)
        # The tag moves to unsigned content: the next pull sees it, though the verdict for v1's digest is remembered.
        StandInRegistryHandler.routes[f"/v2/team/app/manifests/v1"] = StandInRegistryHandler.routes[
            f"/v2/team/app/manifests/v2"]
        self.assertIn(b"no signature (tag v1 is", plugin.authorize(signed))

    def test_policy_tests_say_signed(self) -> None:
        image = f"{self.repository}:v1"
        tests = [{"image": image, "signed": True, "expect": "allow"},
                 {"image": image, "signed": False, "expect": "deny"},
                 {"image": image, "operation": "run", "signed": True, "expect": "allow"},
                 {"image": image, "expect": "deny"}]
        policy = self.signed_policy({"allow": f"{self.host}/team", "signedBy": ["release.pub"]}, tests=tests)
        self.assertEqual(dip.policy_test_failures(policy), [])
        self.assertEqual(policy.configuration()["tests"][0], {"image": image, "expect": "allow", "signed": True})
        self.assertEqual(str(policy.tests[1]), f'"tests"[1] (pull of {image}, unsigned)')
        for unchecked in (dip.judge(policy, dip.PULL, image),   # a test without "signed", and --replay: no registry
                          dip.replay_decision(policy, {"operation": "pull", "image": f"{image}", "rule": "scopes[0]"})):
            self.assertFalse(unchecked.allow)
            self.assertIn("scopes[0] needs a signature by release.pub: no signature can be verified here",
                          unchecked.reason)
        failing = self.signed_policy({"allow": f"{self.host}/team", "signedBy": ["release.pub"]},
                                     tests=[{"image": image, "signed": False, "expect": "allow"}])
        self.assertIn("not signed, as the test says", dip.policy_test_failures(failing)[0])
        with self.assertRaisesRegex(dip.ConfigError, r'"tests"\[0\]\."signed": must be'):
            self.signed_policy({"allow": "docker.io"}, tests=[{"image": "nginx", "signed": "yes", "expect": "allow"}])


def openssl_key(test: unittest.TestCase) -> tuple[Path, dip.PublicKey]:
    """A fresh P-256 private key file (removed after the test) and its public key."""
    if not shutil.which("openssl"):
        test.skipTest("openssl is not installed")
    directory = Path(tempfile.mkdtemp(prefix="dip-key-"))
    test.addCleanup(shutil.rmtree, directory, ignore_errors=True)
    path = directory / "k.key"
    openssl("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", str(path))
    return path, dip.public_key_from_pem(openssl("ec", "-in", str(path), "-pubout").decode(), str(path))


class TestCosign(unittest.TestCase):
    """The plugin's verdicts against `cosign verify --key`'s, for images signed by real cosign 2 and 3."""

    cosign: dict[str, Path]
    dir: Path
    registry: LocalRegistry
    env: dict[str, str]
    keys: dict[str, tuple[dip.PublicKey, ...]]

    @classmethod
    def setUpClass(cls) -> None:
        try:
            cls.cosign = cosign_tools()
        except Missing as missing:
            if REQUIRE_E2E:
                raise AssertionError(f"the cosign differential test is required but cannot run: {missing}") from None
            raise unittest.SkipTest(f"cosign: {missing}") from None
        cls.dir = Path(tempfile.mkdtemp(prefix="dip-cosign-"))
        cls.addClassCleanup(shutil.rmtree, cls.dir, ignore_errors=True)
        cls.registry = LocalRegistry(cls.dir)
        cls.addClassCleanup(cls.registry.close)
        # No password, a home of its own, and no transparency log or signing service anywhere.
        cls.env = dict(os.environ, COSIGN_PASSWORD="", HOME=str(cls.dir), TUF_ROOT=str(cls.dir / "tuf"))
        for name in ("release", "other", "unused"):
            cls.run_cosign("2", "generate-key-pair", "--output-key-prefix", str(cls.dir / name))
        cls.run_cosign("3", "signing-config", "create", "--no-default-fulcio", "--no-default-oidc",
                       "--no-default-rekor", "--no-default-tsa", "--out", str(cls.dir / "signing-config.json"))
        cls.keys = {name: dip.load_public_keys([str(cls.dir / f"{name}.pub")]) for name in ("release", "other", "unused")}

    @classmethod
    def run_cosign(cls, version: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        result = subprocess.run([str(cls.cosign[version]), *args], env=cls.env, capture_output=True, text=True,
                                timeout=120)
        if check and result.returncode:
            raise AssertionError(f"cosign {version} {args[0]}: {result.stderr[-1000:]}")
        return result

    def sign(self, version: str, reference: str, key: str) -> None:
        flags = (["--tlog-upload=false"] if version == "2"
                 else ["--signing-config", str(self.dir / "signing-config.json")])
        self.run_cosign(version, "sign", "--key", str(self.dir / f"{key}.key"), *flags,
                        "--allow-http-registry", "-y", reference)

    def verdicts(self, version: str, reference: str, key: str) -> tuple[bool, dip.SignatureVerdict]:
        """cosign's verdict (exit status 0) and the plugin's, with a client that remembers nothing yet."""
        cosign = self.run_cosign(version, "verify", "--key", str(self.dir / f"{key}.pub"), "--insecure-ignore-tlog",
                                 "--allow-http-registry", reference, check=False)
        ours = dip.verify_image(dip.RegistryClient(), parse_reference(reference), self.keys[key])
        return cosign.returncode == 0, ours

    def tamper(self, version: str, repository: str, digest: str) -> None:
        """Alter the signed payload of the image's signature and store it back, the signature unchanged."""
        registry = self.registry
        if version == "2":
            tag = digest.replace(":", "-") + ".sig"
            manifest = registry.manifest(repository, tag)
            layer = manifest["layers"][0]
            payload = json.loads(registry.blob(repository, layer["digest"]))
            payload["optional"] = {"note": "altered"}
            layer.update({k: v for k, v in registry.push_blob(repository, json.dumps(payload).encode()).items()
                          if k != "mediaType"})
            registry.push_manifest(repository, tag, manifest)
            return
        tag = digest.replace(":", "-")
        index = registry.manifest(repository, tag)
        entry = index["manifests"][0]
        manifest = registry.manifest(repository, entry["digest"])
        layer = manifest["layers"][0]
        bundle = json.loads(registry.blob(repository, layer["digest"]))
        statement = json.loads(base64.b64decode(bundle["dsseEnvelope"]["payload"]))
        statement["predicate"] = {"note": "altered"}
        bundle["dsseEnvelope"]["payload"] = base64.b64encode(json.dumps(statement).encode()).decode()
        layer.update({k: v for k, v in registry.push_blob(repository, json.dumps(bundle).encode()).items()
                      if k != "mediaType"})
        content = json.dumps(manifest).encode()
        entry.update(digest=registry.push_manifest(repository, "sha256:" + hashlib.sha256(content).hexdigest(), content),
                     size=len(content))
        registry.push_manifest(repository, tag, index)

    def copy_signature(self, version: str, repository: str, source: str, target: str) -> None:
        """Store the signature of one digest as the signature of another: a replayed signature."""
        suffix = ".sig" if version == "2" else ""
        name = source.replace(":", "-") + suffix
        content = self.registry.call("GET", f"/v2/{repository}/manifests/{name}", headers={
            "Accept": "application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json"})[1]
        self.registry.push_manifest(repository, target.replace(":", "-") + suffix, content)

    def test_verdicts_equal_cosign_verify(self) -> None:
        other_key = {"2": dip.OTHER_KEY_OR_TAMPERED, "3": dip.OTHER_KEY}
        tampered = {"2": dip.OTHER_KEY_OR_TAMPERED, "3": dip.TAMPERED}
        for version in ("2", "3"):
            repository = f"cosign{version}/app"
            image = f"{self.registry.host}/{repository}"
            digests = {case: self.registry.push_image(repository, case) for case in (
                "signed", "unsigned", "other-key", "replayed", "another-digest", "tampered", "several")}
            self.sign(version, f"{image}@{digests['signed']}", "release")
            self.sign(version, f"{image}@{digests['other-key']}", "other")
            self.sign(version, f"{image}@{digests['replayed']}", "release")
            self.copy_signature(version, repository, digests["replayed"], digests["another-digest"])
            self.sign(version, f"{image}@{digests['tampered']}", "release")
            self.tamper(version, repository, digests["tampered"])
            self.sign(version, f"{image}@{digests['several']}", "other")
            self.sign(version, f"{image}@{digests['several']}", "release")
            kind = "cosign signature" if version == "2" else "sigstore bundle"
            for case, key, expected in [
                ("signed", "release", dip.SignatureVerdict(True, f"signed ({kind})")),
                ("unsigned", "release", dip.SignatureVerdict(False, dip.NO_SIGNATURE)),
                ("other-key", "release", dip.SignatureVerdict(False, other_key[version])),
                ("another-digest", "release", dip.SignatureVerdict(False, dip.OTHER_DIGEST)),
                ("tampered", "release", dip.SignatureVerdict(False, tampered[version])),
                ("several", "release", dip.SignatureVerdict(True, f"signed ({kind})")),
                ("several", "other", dip.SignatureVerdict(True, f"signed ({kind})")),
                ("several", "unused", dip.SignatureVerdict(False, other_key[version])),
            ]:
                with self.subTest(cosign=version, case=case, key=key):
                    cosign, ours = self.verdicts(version, f"{image}@{digests[case]}", key)
                    self.assertEqual(ours, expected)
                    self.assertEqual(ours.ok, cosign)

    def test_tags_resolve_to_the_digest_of_the_bytes(self) -> None:
        digest = self.registry.push_image("resolve/app", "v1")
        client = dip.RegistryClient()
        self.assertEqual(dip.resolve_tag(client, parse_reference(f"{self.registry.host}/resolve/app:v1")), digest)
        with self.assertRaisesRegex(dip.RegistryError, "resolve/app:v2 not found at the registry"):
            dip.resolve_tag(client, parse_reference(f"{self.registry.host}/resolve/app:v2"))


# --------------------------------------------------------------------------
# HTTP handlers and servers
# --------------------------------------------------------------------------

class PluginFixture:
    """A plugin with both listeners on a temporary socket and port."""

    def __init__(self, config: dict[str, Any], log_level: str = "info") -> None:
        self.dir = tempfile.mkdtemp(prefix="dip")
        self.config_path = os.path.join(self.dir, "policy.json")
        self.write_config(config)
        self.log = io.StringIO()
        self.plugin = dip.Plugin(self.config_path, dip.load_tested_policy,
                                 dip.Log(log_level, self.log), dip.DockerAPI("unix:///nonexistent"))
        self.socket_path = os.path.join(self.dir, "p.sock")
        self.server = dip.PluginServer(self.socket_path, self.plugin)
        self.admin = dip.AdminServer(("127.0.0.1", 0), self.plugin)
        self.threads = [threading.Thread(target=s.serve_forever, args=(0.05,)) for s in (self.server, self.admin)]
        for thread in self.threads:
            thread.start()

    def write_config(self, config: dict[str, Any]) -> None:
        Path(self.config_path).write_text(json.dumps(config))

    def close(self) -> None:
        for server in (self.server, self.admin):
            server.shutdown()
            server.server_close()
        for thread in self.threads:
            thread.join()
        shutil.rmtree(self.dir)

    def connect(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(10)
        sock.connect(self.socket_path)
        return sock

    def get(self, path: str, method: str = "GET") -> tuple[int, str, dict[str, str]]:
        connection = http.client.HTTPConnection("127.0.0.1", self.admin.server_address[1], timeout=10)
        connection.request(method, path)
        response = connection.getresponse()
        body = response.read().decode()
        connection.close()
        return response.status, body, dict(response.getheaders())


def exchange(sock: socket.socket, raw: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send raw bytes, read one HTTP response."""
    sock.sendall(raw)
    response = http.client.HTTPResponse(sock)
    response.begin()
    body = response.read()
    return response.status, {k.lower(): v for k, v in response.getheaders()}, body


def post(path: str, body: bytes, extra: str = "") -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: plugin\r\nAccept: application/vnd.docker.plugins.v1.2+json\r\n"
            f"Content-Length: {len(body)}\r\n{extra}\r\n").encode() + body


class TestPluginServer(unittest.TestCase):
    def setUp(self):
        self.fixture = PluginFixture(ORIGINAL_CONFIG)
        self.addCleanup(self.fixture.close)

    def test_large_requests_are_decided_a_few_at_a_time(self):
        # Many large requests at once cannot each hold their body and its decoding: they wait for a turn.
        plugin = self.fixture.plugin
        for _ in range(dip.LARGE_REQUESTS_AT_ONCE):
            plugin.large_requests.acquire()
        large = json.dumps(authz("POST", "/v1.41/containers/create",
                                 {"Image": "redis:7", "Env": ["A=" + "x" * dip.LARGE_REQUEST]})).encode()
        answers: list[dict[str, Any]] = []

        def ask_large() -> None:
            with self.fixture.connect() as sock:
                sock.settimeout(30)
                answers.append(json.loads(exchange(sock, post("/AuthZPlugin.AuthZReq", large))[2]))
        waiting = threading.Thread(target=ask_large)
        waiting.start()
        with self.fixture.connect() as sock:   # a small request is answered meanwhile
            small = json.dumps(pull("/v1.41/images/create?fromImage=nginx&tag=1")).encode()
            self.assertTrue(json.loads(exchange(sock, post("/AuthZPlugin.AuthZReq", small))[2])["Allow"])
        self.assertEqual(answers, [])   # no turn yet
        plugin.large_requests.release()
        waiting.join(30)
        self.assertEqual(len(answers), 1)
        self.assertFalse(answers[0]["Allow"])
        self.assertIn("run of redis:7 denied", answers[0]["Msg"])
        plugin.large_requests.release()

    def test_a_body_of_more_values_than_any_real_one_is_not_decoded(self):
        body = json.dumps({"Image": "nginx:1", "HostConfig": {"Mounts": [{}] * (dip.MAX_BODY_VALUES // 2 + 1)}})
        decision = dip.decide(policy_of({"defaultAllow": True}),
                              authz("POST", "/v1.41/containers/create", body.encode()), NO_DOCKER)
        self.assertEqual((decision.allow, decision.rule), (False, "unreadable"))
        self.assertIn("JSON values, more than any container or service dockerd creates (100,000): not decoded",
                      decision.reason)
        body = json.dumps({"Image": "nginx:1", "HostConfig": {"Mounts": [{}] * 1000}})
        self.assertTrue(dip.decide(policy_of({"defaultAllow": True}),
                                   authz("POST", "/v1.41/containers/create", body.encode()), NO_DOCKER).allow)

    def test_activation_and_keep_alive(self):
        with self.fixture.connect() as sock:
            status, headers, body = exchange(sock, post("/Plugin.Activate", b""))
            self.assertEqual((status, json.loads(body)), (200, {"Implements": ["authz"]}))
            self.assertEqual(headers["content-type"], "application/vnd.docker.plugins.v1+json")
            for image, allow in [("nginx", True), ("redis", False), ("nginx", True)]:   # same connection
                request = json.dumps(pull(f"/v1.41/images/create?fromImage={image}&tag=1")).encode()
                status, _, body = exchange(sock, post("/AuthZPlugin.AuthZReq", request))
                self.assertEqual((status, json.loads(body)["Allow"]), (200, allow))
            status, _, body = exchange(sock, post("/AuthZPlugin.AuthZRes", b'{"ResponseBody": "not decoded"'))
            self.assertEqual(json.loads(body), {"Allow": True, "Msg": "", "Err": ""})

    def test_deny_answer_carries_the_message(self):
        with self.fixture.connect() as sock:
            request = json.dumps(pull("/v1.41/images/create?fromImage=docker.io/library/ubuntu&tag=22.04"))
            _, _, body = exchange(sock, post("/AuthZPlugin.AuthZReq", request.encode()))
        self.assertEqual(json.loads(body), {"Allow": False, "Err": "", "Msg":
                         'pull of ubuntu:22.04 denied: blacklist rule "^ubuntu:" matches'})

    def test_malformed_requests_never_allow(self):
        not_an_object = "request denied: the AuthZ request is not a JSON object"
        deep = base64.b64encode(b"[" * 100000).decode()
        for body, message in [
            (b"", f"request denied: {dip.EMPTY_REQUEST}"), (b" \n", f"request denied: {dip.EMPTY_REQUEST}"),
            (b"{", not_an_object), (b"null", not_an_object), (b"[]", not_an_object),
            (b'"x"', not_an_object), (b"\xff" * 10, not_an_object), (b"[" * 100000, not_an_object),
            (b'{"RequestMethod":"POST","RequestUri":"/v1.41/images/create?fromImage=redis&tag=1"]', not_an_object),
            (b'{"RequestMethod":"POST"}',
             "request denied: the AuthZ request has no RequestMethod or RequestUri string"),
            (b'{"RequestMethod":"POST","RequestUri":"/v1.41/containers/create","RequestBody":"!!"}',
             "run denied: RequestBody is not valid base64"),
            (f'{{"RequestMethod":"POST","RequestUri":"/v1.41/containers/create","RequestBody":"{deep}"}}'.encode(),
             "run denied: the request body is nested too deeply to read"),
        ]:
            with self.subTest(body[:40]), self.fixture.connect() as sock:
                status, _, answer = exchange(sock, post("/AuthZPlugin.AuthZReq", body))
                self.assertEqual((status, json.loads(answer)), (200, {"Allow": False, "Msg": message, "Err": ""}))
        lines = self.fixture.log.getvalue().splitlines()
        self.assertEqual([json.loads(line)["rule"] for line in lines], ["unreadable"] * 12)   # no internal error

    def test_protocol_errors(self):
        for raw, status, error in [
            (b"GET /Plugin.Activate HTTP/1.1\r\nHost: x\r\n\r\n", 405, "plugin endpoints accept POST only"),
            (post("/Nope", b""), 404, "no such plugin endpoint b'/Nope'"),
            (b"POST /AuthZPlugin.AuthZReq HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 501,
             "chunked requests are not supported; send Content-Length"),
            (b"POST /AuthZPlugin.AuthZReq HTTP/1.1\r\nContent-Length: x\r\n\r\n", 400, "invalid Content-Length"),
            # More digits than Python converts to an int (4300): still just a bad request.
            (b"POST /AuthZPlugin.AuthZReq HTTP/1.1\r\nContent-Length: " + b"9" * 5000 + b"\r\n\r\n", 400,
             "invalid Content-Length"),
            (b"nonsense\r\n\r\n", 400, "malformed request line"),
            (b"POST /" + b"a" * 9000 + b" HTTP/1.1\r\n\r\n", 414, "request line too long"),
            (b"POST / HTTP/1.1\r\n" + b"X-A: b\r\n" * 101 + b"\r\n", 431, "more than 100 headers"),
            (b"POST / HTTP/1.1\r\nX-A: " + b"b" * 9000 + b"\r\n\r\n", 431, "header line too long"),
        ]:
            with self.subTest(raw[:30]), self.fixture.connect() as sock:
                answer, headers, body = exchange(sock, raw)
                self.assertEqual((answer, json.loads(body), headers["connection"]), (status, {"Err": error}, "close"))
                self.assertEqual(sock.recv(1), b"")   # and the connection is closed
        self.assertEqual(self.fixture.log.getvalue(), "")   # answered, not logged as errors

    def test_connection_header_and_http_1_0(self):
        for version, header, stays_open in [
            ("1.1", "", True), ("1.1", "Connection: keep-alive\r\n", True), ("1.1", "Connection: close\r\n", False),
            ("1.1", "connection:  Close \r\n", False), ("1.0", "", False), ("1.0", "Connection: keep-alive\r\n", True),
            ("1.0", "CONNECTION: Keep-Alive\r\n", True), ("1.0", "Connection: close\r\n", False),
        ]:
            request = f"POST /Plugin.Activate HTTP/{version}\r\nContent-Length: 0\r\n{header}\r\n".encode()
            with self.subTest(version=version, header=header), self.fixture.connect() as sock:
                status, _, body = exchange(sock, request)
                self.assertEqual((status, json.loads(body)), (200, {"Implements": ["authz"]}))
                if stays_open:
                    self.assertEqual(exchange(sock, request)[0], 200)
                else:
                    self.assertEqual(sock.recv(1), b"")   # closed after the answer

    def test_worker_threads_are_reused_and_few_stay_idle(self):
        server = self.fixture.server
        workers: list[threading.Thread] = []
        work = server.work

        def counted_work(inbox: Any) -> None:
            workers.append(threading.current_thread())
            work(inbox)
        server.work = counted_work   # what process_request starts a new thread with
        for _ in range(5):   # one connection after another: one thread serves them all
            with self.fixture.connect() as sock:
                self.assertEqual(exchange(sock, post("/Plugin.Activate", b""))[0], 200)
            wait_for(lambda: len(server.idle_workers) == 1, "the worker to be idle")
        self.assertEqual(len(workers), 1)
        busy = server.max_idle_workers + 8
        connections = [self.fixture.connect() for _ in range(busy)]
        for sock in connections:   # each open connection holds a thread
            self.assertEqual(exchange(sock, post("/Plugin.Activate", b""))[0], 200)
        self.assertEqual(len(workers), busy)
        for sock in connections:
            sock.close()
        wait_for(lambda: len(server.idle_workers) == server.max_idle_workers, "the idle workers")
        wait_for(lambda: sum(worker.is_alive() for worker in workers) == server.max_idle_workers,
                 "the workers beyond max_idle_workers to end")
        connections = [self.fixture.connect() for _ in range(server.max_idle_workers)]
        for sock in connections:
            self.assertEqual(exchange(sock, post("/Plugin.Activate", b""))[0], 200)
            sock.close()
        self.assertEqual(len(workers), busy)   # served by idle threads only

    def test_lookups_that_call_back_into_the_plugin_do_not_deadlock(self):
        # While the plugin asks the Docker API about an image, dockerd asks the
        # plugin about that very GET on a new connection. A burst of such
        # decisions, all waiting on the Docker API at once, needs a thread for
        # each decision and for each callback.
        burst = 24
        everyone_waits = threading.Barrier(burst, timeout=20)
        plugin_socket = self.fixture.socket_path
        callbacks: list[tuple[str, Any]] = []
        failures: list[str] = []

        class DockerAPIHandler(StandInDockerHandler):
            def answer(self) -> tuple[int, Any]:
                if self.path.startswith("/images/") and self.path != "/images/json?all=1":
                    everyone_waits.wait()
                with socket.socket(socket.AF_UNIX) as sock:   # as dockerd does, before it answers
                    sock.settimeout(20)
                    sock.connect(plugin_socket)
                    request = json.dumps(authz("GET", "/v1.41" + self.path)).encode()
                    callbacks.append((self.path, json.loads(exchange(sock, post("/AuthZPlugin.AuthZReq", request))[2])))
                if self.path == "/images/json?all=1":
                    document: Any = []
                else:
                    number = int(self.path.split("/")[2], 16)
                    document = {"Id": f"sha256:{number:04x}" + "0" * 60, "RepoDigests": [],
                                "RepoTags": ["nginx:1" if number % 2 == 0 else "redis:7"]}
                return 200, document

        class DockerAPIServer(socketserver.ThreadingUnixStreamServer):
            request_queue_size = burst   # the whole burst connects at once

            def handle_error(self, request: Any, client_address: Any) -> None:
                failures.append(repr(sys.exc_info()[1]))

        docker_path = os.path.join(self.fixture.dir, "docker.sock")
        docker_api = DockerAPIServer(docker_path, DockerAPIHandler)
        thread = threading.Thread(target=docker_api.serve_forever, args=(0.05,))
        thread.start()
        self.addCleanup(thread.join)
        self.addCleanup(docker_api.server_close)
        self.addCleanup(docker_api.shutdown)
        self.fixture.plugin.docker = dip.DockerAPI(f"unix://{docker_path}", timeout=20)
        answers: dict[int, Any] = {}

        def run(number: int) -> None:
            with self.fixture.connect() as sock:
                sock.settimeout(30)
                request = json.dumps(authz("POST", "/v1.41/containers/create", {"Image": f"{number:04x}"})).encode()
                answers[number] = json.loads(exchange(sock, post("/AuthZPlugin.AuthZReq", request))[2])
        clients = [threading.Thread(target=run, args=(number,)) for number in range(burst)]
        for client in clients:
            client.start()
        for client in clients:
            client.join(60)
        self.assertFalse(any(client.is_alive() for client in clients), "deadlocked")
        self.assertEqual(failures, [])
        denied = ("run of {:04x} denied: none of its names is allowed (no whitelist rule matches and defaultAllow"
                  " is false for redis:7)")
        self.assertEqual(answers, {number: {"Allow": number % 2 == 0, "Err": "",
                                            "Msg": "" if number % 2 == 0 else denied.format(number)}
                                   for number in range(burst)})
        self.assertEqual(sorted(path for path, _ in callbacks),
                         sorted([f"/images/{number:04x}/json" for number in range(burst)]
                                + ["/images/json?all=1"] * burst))
        self.assertEqual([answer for _, answer in callbacks], [{"Allow": True, "Msg": "", "Err": ""}] * 2 * burst)

    def test_largest_engine_payloads_fit(self):
        # Newer engines forward bodies up to 4 MiB, base64-encoded.
        image = {"Image": "nginx:1", "Env": ["A=" + "x" * (4 * 1024 * 1024 - 100)]}
        request = json.dumps(authz("POST", "/v1.41/containers/create", image)).encode()
        self.assertGreater(len(request), 5_500_000)
        response = json.dumps({**authz("POST", "/v1.41/containers/create", image),
                               "ResponseBody": base64.b64encode(b"r" * 1_000_000).decode()}).encode()
        with self.fixture.connect() as sock:
            _, _, body = exchange(sock, post("/AuthZPlugin.AuthZReq", request))
            self.assertIs(json.loads(body)["Allow"], True)
            _, _, body = exchange(sock, post("/AuthZPlugin.AuthZRes", response))
            self.assertIs(json.loads(body)["Allow"], True)
            oversized = b"x" * (dip.MAX_BODY + 1)
            _, _, body = exchange(sock, post("/AuthZPlugin.AuthZReq", oversized))
            self.assertEqual(json.loads(body)["Allow"], False)
            self.assertIn("larger than", json.loads(body)["Msg"])
            _, _, body = exchange(sock, post("/AuthZPlugin.AuthZRes", oversized))
            self.assertIs(json.loads(body)["Allow"], True)

    def test_stalled_client_does_not_delay_others(self):
        with self.fixture.connect() as stalled:
            stalled.sendall(b"POST /AuthZPlugin.AuthZReq HTTP/1.1\r\nContent-Length: 100\r\n\r\n{")
            started = time.monotonic()
            with self.fixture.connect() as sock:
                status, _, _ = exchange(sock, post("/Plugin.Activate", b""))
            self.assertEqual(status, 200)
            self.assertLess(time.monotonic() - started, 2)

    def test_idle_connections_are_closed(self):
        handler = dip.PluginHandler
        original, handler.timeout = handler.timeout, 0.3
        self.addCleanup(setattr, handler, "timeout", original)
        with self.fixture.connect() as sock:
            sock.sendall(b"POST /AuthZPlugin.AuthZReq HTTP/1.1\r\nContent-Le")
            sock.settimeout(5)
            self.assertEqual(sock.recv(100), b"")   # closed by the plugin

    def test_socket_is_root_only_and_removed_on_close(self):
        self.assertEqual(stat.S_IMODE(os.stat(self.fixture.socket_path).st_mode), 0o600)
        path = self.fixture.socket_path
        with self.assertRaises(dip.ImagePolicyError) as caught:
            dip.PluginServer(path, self.fixture.plugin)
        self.assertIn("another process is already serving", str(caught.exception))
        # A server closing removes its socket, and only its own: one bound at
        # the same path since (after the first was unlinked) stays in place.
        own = os.path.join(self.fixture.dir, "own.sock")
        server = dip.PluginServer(own, self.fixture.plugin)
        self.assertEqual(stat.S_IMODE(os.stat(own).st_mode), 0o600)
        server.server_close()
        self.assertFalse(os.path.lexists(own))
        first = dip.PluginServer(own, self.fixture.plugin)
        os.unlink(own)
        successor = dip.PluginServer(own, self.fixture.plugin)
        self.addCleanup(successor.server_close)
        first.server_close()
        self.assertEqual(os.stat(own).st_ino, successor.inode)
        with socket.socket(socket.AF_UNIX) as probe:
            probe.connect(own)   # still the successor's, and listening
        successor.server_close()
        self.assertFalse(os.path.lexists(own))

    def test_stale_socket_is_replaced_and_other_files_are_not(self):
        directory = self.fixture.dir
        stale = os.path.join(directory, "stale.sock")
        with socket.socket(socket.AF_UNIX) as old:
            old.bind(stale)
        server = dip.PluginServer(stale, self.fixture.plugin)
        server.server_close()
        self.assertFalse(os.path.exists(stale))
        regular = os.path.join(directory, "file.sock")
        Path(regular).write_text("keep me")
        with self.assertRaises(dip.ImagePolicyError) as caught:
            dip.PluginServer(regular, self.fixture.plugin)
        self.assertIn("is not a socket", str(caught.exception))
        self.assertEqual(Path(regular).read_text(), "keep me")


class TestAdmin(unittest.TestCase):
    def setUp(self):
        self.fixture = PluginFixture(ORIGINAL_CONFIG)
        self.addCleanup(self.fixture.close)

    def test_endpoints(self):
        self.assertEqual(self.fixture.get("/health")[:2], (200, "HEALTHY"))
        self.assertEqual(self.fixture.get("/version")[:2], (200, dip.__version__))   # as the original answered
        status, body, _ = self.fixture.get("/config")
        self.assertEqual(json.loads(body), {   # the configuration object at the top level, as the original's
            **ORIGINAL_CONFIG, "scopes": [], "mode": "enforce", "checkRun": True, "allowBuild": False, "allowCommit": False,
            "allowImport": False, "allowLoad": False, "allowPluginCreate": False, "allowSwarm": False,
            "message": "", "tests": []})
        self.assertTrue(body.startswith('{\n    "whitelist": [\n        "^nginx:",'), body)
        status = json.loads(self.fixture.get("/status?pretty=1")[1])
        digest = hashlib.sha256(Path(self.fixture.config_path).read_bytes()).hexdigest()
        self.assertEqual(status["policy"], {"file": self.fixture.config_path, "sha256": digest,
                                            "rules": {"whitelist": 3, "blacklist": 1, "scopes": 0}})
        self.assertEqual((status["version"], status["mode"], status["lastReload"]["ok"], status["lastReload"]["error"]),
                         (dip.__version__, "enforce", True, None))
        self.assertRegex(status["started"], r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")
        self.assertEqual(self.fixture.get("/health?x=1")[:2], (200, "HEALTHY"))   # a query string is ignored
        status, body, headers = self.fixture.get("/nope")
        self.assertEqual((status, headers["Content-Type"]), (404, "text/plain; charset=utf-8"))
        self.assertEqual(body, "404 no such endpoint (try /health, /config, /version, /status, /metrics)\n")
        self.assertEqual(headers["Server"], "docker-image-policy")   # no Python version
        for method in ["POST", "PUT", "DELETE"]:
            self.assertEqual(self.fixture.get("/health", method)[:2],
                             (405, "405 the admin listener is read-only: GET and HEAD only\n"))
        connection = http.client.HTTPConnection("127.0.0.1", self.fixture.admin.server_address[1], timeout=10)
        self.addCleanup(connection.close)
        connection.request("HEAD", "/health")
        response = connection.getresponse()
        self.assertEqual((response.status, response.read(), response.getheader("Content-Length")), (200, b"", "7"))
        connection.request("GET", "/version")   # the same connection: a GET after a HEAD has its body
        self.assertEqual(connection.getresponse().read(), dip.__version__.encode())

    def test_stalled_client_does_not_delay_others(self):
        with socket.create_connection(("127.0.0.1", self.fixture.admin.server_address[1])) as stalled:
            stalled.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")   # and never finishes
            started = time.monotonic()
            self.assertEqual(self.fixture.get("/health")[:2], (200, "HEALTHY"))
            self.assertLess(time.monotonic() - started, 2)

    def test_binds_loopback_by_default(self):
        self.assertEqual(dip.parse_addr(dip.DEFAULT_ADDR), ("127.0.0.1", 5006))
        self.assertEqual(dip.parse_addr("[::1]:7"), ("::1", 7))
        with self.assertRaises(ValueError):
            dip.parse_addr("5006")
        # The daemon as the CLI starts it, without --addr: the admin listener
        # gets the default address and binds its host (on a free port, so that
        # the test needs no fixed one).
        program = ("import sys, docker_image_policy as dip\n"
                   "class AdminServer(dip.AdminServer):\n"
                   "    def __init__(self, address, plugin):\n"
                   "        super().__init__((address[0], 0), plugin)\n"
                   "        print(address, self.socket.family.name, *self.socket.getsockname(), flush=True)\n"
                   "dip.AdminServer = AdminServer\n"
                   "sys.exit(dip.main(sys.argv[1:]))\n")
        environment = {key: value for key, value in os.environ.items() if key != "NOTIFY_SOCKET"}
        process = subprocess.Popen([sys.executable, "-c", program, "--config", self.fixture.config_path,
                                    "--socket", os.path.join(self.fixture.dir, "d.sock")], cwd=HERE,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environment)
        self.addCleanup(process.stderr.close)
        self.addCleanup(process.stdout.close)
        self.addCleanup(stop_processes, [process])
        line = process.stdout.readline()
        self.assertTrue(line, "the daemon exited before binding its admin listener")
        address, family, host, port = line.rsplit(" ", 3)
        self.assertEqual((address, family, host), ("('127.0.0.1', 5006)", "AF_INET", "127.0.0.1"))
        connection = http.client.HTTPConnection("127.0.0.1", int(port), timeout=10)
        self.addCleanup(connection.close)
        connection.request("GET", "/health")
        self.assertEqual(connection.getresponse().read(), b"HEALTHY")
        process.terminate()
        self.assertEqual(process.wait(20), 0)
        self.assertIn(f"admin on 127.0.0.1:{port.strip()}, policy", process.stderr.read())   # the port bound


# --------------------------------------------------------------------------
# Operating it: reload, audit, decision log, metrics, CLI, service
# --------------------------------------------------------------------------

def answer_healthy(listener: socket.socket) -> None:
    """Answer every connection with HEALTHY, as a process squatting the admin port can, until closed."""
    while True:
        try:
            connection, _ = listener.accept()
        except OSError:
            return
        with connection:
            connection.settimeout(10)
            with contextlib.suppress(OSError):
                connection.recv(65536)
                connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 7\r\nConnection: close\r\n\r\nHEALTHY")
                connection.recv(1)   # the client closes first: no TIME_WAIT holds the port after the squatter


def http_get(address: str, path: str) -> str:
    host, port = address.rsplit(":", 1)
    connection = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        connection.request("GET", path)
        return connection.getresponse().read().decode()
    finally:
        connection.close()


def run_module(*args: str, **kwargs: Any) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(MODULE), *args], capture_output=True, text=True, timeout=60, **kwargs)


class Stream:
    """A stand-in for stderr that records each write and the thread that made
    it; it can stall (each write waits until it is opened again)."""

    def __init__(self) -> None:
        self.writes: list[tuple[threading.Thread, str]] = []
        self.open = threading.Event()
        self.open.set()
        self.entered = threading.Event()   # a write has started
        self.finishing = False             # set by buffered_log's cleanup

    def write(self, text: str) -> int:
        self.entered.set()
        self.open.wait()
        if self.finishing:
            raise SystemExit   # ends the log's flush thread, quietly
        self.writes.append((threading.current_thread(), text))
        return len(text)

    def flush(self) -> None:
        pass

    def getvalue(self) -> str:
        return "".join(text for _, text in self.writes)


def buffered_log(test: unittest.TestCase, stream: Stream, interval: float) -> tuple[dip.Log, threading.Thread]:
    """A Log buffered as the daemon's is, and its flush thread, which the test's cleanup ends."""
    log = dip.Log("info", stream)
    before = set(threading.enumerate())
    log.buffer(interval)
    (flusher,) = [thread for thread in threading.enumerate() if thread not in before and thread.name == "log-flush"]

    def finish() -> None:
        stream.finishing = True
        stream.open.set()
        with contextlib.suppress(SystemExit):   # raised here only if the calling thread writes
            log.decision(decision_number(0), "deny", ENFORCE)   # something to flush
        flusher.join(10)
    test.addCleanup(finish)
    return log, flusher


def decision_number(number: int) -> dip.Decision:
    return dip.Decision(False, dip.PULL, f"docker.io/library/redis:{number}", f"redis:{number}", "defaultAllow",
                        "no whitelist rule matches and defaultAllow is false")


class TestOperations(unittest.TestCase):
    def setUp(self):
        self.fixture = PluginFixture(ORIGINAL_CONFIG)
        self.addCleanup(self.fixture.close)

    def ask(self, request: dict[str, Any]) -> dict[str, Any]:
        with self.fixture.connect() as sock:
            return json.loads(exchange(sock, post("/AuthZPlugin.AuthZReq", json.dumps(request).encode()))[2])

    def test_reload_replaces_policy_or_keeps_it(self):
        redis = pull("/v1.41/images/create?fromImage=redis&tag=7")
        self.assertFalse(self.ask(redis)["Allow"])
        self.fixture.write_config({"whitelist": ["^redis:"]})
        self.assertTrue(self.fixture.plugin.reload())
        self.assertTrue(self.ask(redis)["Allow"])
        self.fixture.write_config({"whitelist": ["^redis:("]})
        self.assertFalse(self.fixture.plugin.reload())
        self.assertTrue(self.ask(redis)["Allow"])   # the running policy stays
        error = f'{self.fixture.config_path}: "whitelist"[0]: invalid regular expression "^redis:(":' \
                " missing closing ): `^redis:(` (rules are RE2 syntax, as Go's regexp reads them)"
        self.assertIn(f"reload failed, the running policy stays in force: {error}", self.fixture.log.getvalue())
        self.assertEqual(json.loads(self.fixture.get("/status")[1])["lastReload"]["error"], error)
        self.assertEqual(json.loads(self.fixture.get("/config")[1])["whitelist"], ["^redis:"])
        metrics = self.fixture.get("/metrics")[1]
        self.assertIn('docker_image_policy_reloads_total{outcome="success"} 1', metrics)   # the first load is none
        self.assertIn('docker_image_policy_reloads_total{outcome="failure"} 1', metrics)
        self.assertIn("docker_image_policy_config_last_reload_successful 0\n", metrics)   # while the file is broken
        digest = hashlib.sha256(b'{"whitelist": ["^redis:"]}').hexdigest()
        self.assertIn(f'docker_image_policy_policy_info{{file="{self.fixture.config_path}",sha256="{digest}",'
                      f'mode="enforce"}} 1\n', metrics)   # the policy still in force
        self.fixture.write_config({"whitelist": ["^redis:"], "blacklist": []})
        self.assertTrue(self.fixture.plugin.reload())
        self.assertIn("docker_image_policy_config_last_reload_successful 1\n", self.fixture.get("/metrics")[1])

    def test_audit_mode_allows_and_logs_would_deny(self):
        self.fixture.write_config(dict(ORIGINAL_CONFIG, mode="audit"))
        self.fixture.plugin.reload()
        answer = self.ask(pull("/v1.41/images/create?fromImage=redis&tag=7"))
        self.assertTrue(answer["Allow"])
        line = self.fixture.log.getvalue().splitlines()[-1]
        record = json.loads(line)
        self.assertEqual({k: record[k] for k in ("decision", "mode", "operation", "image", "rule")},
                         {"decision": "would-deny", "mode": "audit", "operation": "pull",
                          "image": "docker.io/library/redis:7", "rule": "defaultAllow"})
        self.assertIn('docker_image_policy_decisions_total{operation="pull",decision="would-deny"} 1',
                      self.fixture.get("/metrics")[1])

    def test_request_text_is_cut_in_reasons_and_log_lines(self):
        query = "fromImage=" + "%zz" * 300_000
        answer = self.ask(pull("/v1.41/images/create?" + query))
        self.assertEqual(answer["Msg"], f"pull or import denied: invalid %-escape in {'%zz' * 66 + '%z'!r}…"
                                        f" ({len(query) - len('fromImage=')} characters)")
        target = "\ufffd" * 100_000
        answer = self.ask(authz("POST", target))
        self.assertEqual(answer["Msg"], f"request denied: request target {target[:200]!r}… (100000 characters) is"
                                        " neither a path nor an absolute URL")
        # Longer than dockerd reads (1 MiB with the headers): denied before it is parsed.
        target = "/v1.41/images/create?fromImage=nginx&tag=" + "1" * dip.MAX_TARGET
        self.assertEqual(self.ask(pull(target))["Msg"], f"request denied: a request target of {len(target)}"
                                                        " characters, longer than dockerd reads")
        for line in self.fixture.log.getvalue().splitlines():
            self.assertLess(len(line), 1024, line[:100])
            self.assertEqual(json.loads(line)["rule"], "unreadable")

    def test_longest_decision_line(self):
        # Every field at its longest and costliest to encode (a control character is
        # \u0000, a character outside the BMP two \u escapes), in the longest outcome.
        worst = "\x00\U0001f600\ud800\u2028\"" * 100_000
        decision = dip.Decision(False, dip.PULL_ALL_TAGS, *[worst] * 4, user=worst, named="n" + worst, target=worst)
        log = io.StringIO()
        with mock.patch.dict(os.environ, JOURNAL_STREAM="x"), mock.patch.object(dip, "stderr_is_journal",
                                                                                return_value=True):
            dip.Log("info", log).decision(decision, "would-deny", dip.compile_policy('{"mode": "audit"}', "p.json"))
        line = log.getvalue()
        self.assertTrue(line.startswith("<5>{"), line[:10])
        record = json.loads(line[3:])
        self.assertEqual(set(record), {"time", "decision", "mode", "policy", "operation", "image", "rule", "reason",
                                       "name", "target", "user"})
        for key in ("image", "rule", "reason", "name", "target", "user"):
            self.assertTrue(record[key].endswith(f"… (cut, {len(worst) + (key == 'name')} characters)"), key)
            self.assertLessEqual(len(json.dumps(record[key])), dip.MAX_LOG_FIELD)
        self.assertLess(len(line.encode()), 8 * 1024)   # the bound the README states; journald's LineMax is 48 KiB
        # Short fields are left whole.
        self.assertNotIn("cut", dip.Decision(False, dip.PULL, "docker.io/library/redis:7", "redis:7", "r", "x" * 900)
                         .log_fields)

    def test_decision_fields_are_written_as_json_dumps_writes_them(self):
        rng = random.Random(7)
        pieces = ["\"", "\\", "\x00", "\x1f", "\x7f", "\u2028", "\ufeff", "\ud800", "\U0001f600", "é", "a", ":", "/"]
        caller = dip.Caller(True, "ci-\"runner\\", ("Org\u2028",), ("\ud800",))
        for _ in range(2000):
            text = [("".join(rng.choice(pieces) for _ in range(rng.randrange(12))) or "x") for _ in range(6)]
            # A name that is no reference (upper case): always logged beside the image.
            decision = dip.Decision(rng.random() < 0.5, dip.RUN, text[0], "", text[1], text[2], user=text[3],
                                    named="N" + text[4], target=text[5], caller=caller if rng.random() < 0.5 else
                                    dip.UNIDENTIFIED)
            fields = {"operation": "run", "image": text[0], "rule": text[1], "reason": text[2], "name": "N" + text[4],
                      "target": text[5], "user": text[3]}
            if decision.caller.identified:
                fields["caller"] = caller.document()
            self.assertEqual("{" + decision.log_fields, json.dumps(fields))

    def test_remembered_answers_under_concurrent_threads(self):
        answers = dip.Answers(64)
        answer = (dip.BENIGN, "allow", dip.ALLOW_RESPONSE)
        hot = [b"hot-%d" % n for n in range(8)]
        errors: list[BaseException] = []

        def use(seed: int) -> None:
            rng = random.Random(seed)
            try:
                for step in range(20_000):
                    body = hot[step % len(hot)]
                    if answers.get(body) is None:
                        answers.put(body, answer)
                    distinct = b"cold-%d" % rng.randrange(10_000)
                    if answers.get(distinct) is None:
                        answers.put(distinct, answer)
                    self.assertLessEqual(len(answers), 64)
            except BaseException as error:   # reported by the main thread
                errors.append(error)
        threads = [threading.Thread(target=use, args=(seed,)) for seed in range(8)]
        previous = sys.getswitchinterval()
        sys.setswitchinterval(1e-6)   # switch threads as often as possible
        try:
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(60)
        finally:
            sys.setswitchinterval(previous)
        self.assertEqual(errors, [])
        self.assertEqual(len(answers), 64)
        self.assertEqual(len(answers.bodies()), len(set(answers.bodies())))
        for body in hot:   # used all the time: never the least recently used
            self.assertIn(body, answers)

    def test_decision_log_has_no_secrets_and_skips_benign_calls(self):
        secret_body = {"Image": "nginx:1", "Env": ["PASSWORD=hunter2"]}
        self.ask(authz("POST", "/v1.41/containers/create", secret_body, User="alice", RequestHeaders={
            "Content-Type": "application/json", "X-Registry-Auth": "c2VjcmV0"}))
        self.ask(authz("GET", "/v1.41/containers/json"))
        lines = [json.loads(line) for line in self.fixture.log.getvalue().splitlines()]
        self.assertEqual(len(lines), 1)
        self.assertEqual(set(lines[0]), {"time", "operation", "image", "decision", "rule", "reason", "mode", "user",
                                         "caller", "policy"})
        self.assertEqual(lines[0]["policy"], self.fixture.plugin.policy.sha256[:12])
        # A User without the certificate dockerd sends with it is an identity the plugin cannot read.
        self.assertEqual(lines[0]["caller"], {"cn": "", "o": [], "ou": [], "unreadable": True})
        self.assertEqual((lines[0]["user"], lines[0]["decision"]), ("alice", "allow"))
        self.assertNotIn("hunter2", self.fixture.log.getvalue())
        self.assertNotIn("c2VjcmV0", self.fixture.log.getvalue())
        self.fixture.plugin.log.level = dip.LOG_LEVELS["debug"]
        self.ask(authz("GET", "/v1.41/containers/json"))
        self.assertEqual(json.loads(self.fixture.log.getvalue().splitlines()[-1])["operation"], "other")

    def test_metrics(self):
        self.ask(pull("/v1.41/images/create?fromImage=redis&tag=7"))
        self.ask(authz("GET", "/_ping"))
        status, body, headers = self.fixture.get("/metrics")
        self.assertTrue(headers["Content-Type"].startswith("text/plain; version=0.0.4"))
        for line in ["# TYPE docker_image_policy_decisions_total counter",
                     'docker_image_policy_decisions_total{operation="pull",decision="deny"} 1',
                     'docker_image_policy_decisions_total{operation="other",decision="allow"} 1',
                     'docker_image_policy_rules{list="whitelist"} 3',
                     "# TYPE docker_image_policy_authz_request_seconds histogram",
                     'docker_image_policy_authz_request_seconds_bucket{le="+Inf"} 2',
                     "docker_image_policy_authz_request_seconds_count 2",
                     "# TYPE docker_image_policy_last_reload_success_timestamp_seconds gauge",
                     f'docker_image_policy_build_info{{version="{dip.__version__}"}} 1',
                     "docker_image_policy_policy_file_drift 0"]:
            self.assertIn(line + "\n", body)
        for name in re.findall(r"^# TYPE (\S+)", body, re.M):
            self.assertIn(f"# HELP {name} ", body)

    def test_drift_between_the_file_and_the_policy_in_force(self):
        def drift() -> tuple[str, dict[str, Any]]:
            metric = re.search(r"^docker_image_policy_policy_file_drift (\d)$", self.fixture.get("/metrics")[1], re.M)
            return metric[1], json.loads(self.fixture.get("/status")[1])["fileOnDisk"]
        in_force = self.fixture.plugin.policy.sha256
        self.assertEqual(drift(), ("0", {"sha256": in_force, "inForce": True}))
        self.fixture.write_config({"whitelist": ["^redis:"]})   # edited, nobody reloaded
        edited = hashlib.sha256(b'{"whitelist": ["^redis:"]}').hexdigest()
        self.assertEqual(drift(), ("1", {"sha256": edited, "inForce": False}))
        self.assertTrue(self.fixture.plugin.reload())
        self.assertEqual(drift(), ("0", {"sha256": edited, "inForce": True}))
        self.fixture.write_config({"whitelist": ["^redis:("]})   # its reload fails: the old policy stays
        self.assertFalse(self.fixture.plugin.reload())
        self.assertEqual(drift()[0], "1")
        os.unlink(self.fixture.config_path)
        self.assertEqual(drift(), ("1", {"sha256": None, "inForce": False}))

    def test_remembered_decisions_never_outlive_their_inputs(self):
        request = authz("POST", "/v1.41/containers/create", {"Image": "abcd"})
        image_id = "sha256:abcd" + "0" * 60
        docker = FakeDocker({"abcd": [dip.LocalImage(image_id, ("nginx:1",))]})
        self.fixture.plugin.docker = docker
        self.assertTrue(self.ask(request)["Allow"])
        docker.lookups["abcd"] = [dip.LocalImage(image_id, ("redis:7",))]   # the daemon's answer changed: asked again
        self.assertEqual(self.ask(request)["Msg"], "run of abcd denied: none of its names is allowed"
                         " (no whitelist rule matches and defaultAllow is false for redis:7)")
        self.assertEqual(docker.looked_up, ["abcd", "abcd"])
        pull_redis = pull("/v1.41/images/create?fromImage=redis&tag=7")
        self.assertFalse(self.ask(pull_redis)["Allow"])
        self.assertFalse(self.ask(pull_redis)["Allow"])
        self.fixture.write_config({"whitelist": ["^redis:"]})
        self.fixture.plugin.reload()   # a new policy starts with nothing remembered
        self.assertTrue(self.ask(pull_redis)["Allow"])

    def test_remembered_decisions_are_bounded(self):
        plugin = self.fixture.plugin
        memory = plugin.current.answers

        def answer(body: bytes) -> dict[str, Any]:
            return json.loads(plugin.authorize(body).partition(b"\r\n\r\n")[2])
        pulls = [json.dumps(pull(f"/v1.41/images/create?fromImage=redis&tag={n}")).encode()
                 for n in range(dip.CACHE_ENTRIES + 1)]
        denied = "pull of redis:{} denied: no whitelist rule matches and defaultAllow is false"
        with mock.patch.object(plugin, "decide", wraps=plugin.decide) as decide:
            for _ in range(2):   # decided once, then answered from memory
                for number, body in enumerate(pulls[:-1]):
                    self.assertEqual(answer(body), {"Allow": False, "Msg": denied.format(number), "Err": ""})
            self.assertEqual((decide.call_count, len(memory)), (dip.CACHE_ENTRIES, dip.CACHE_ENTRIES))
            # One more is more than it keeps: the least recently used one is forgotten (the
            # second: the first was just used again), and decided again when it comes back.
            self.assertEqual(answer(pulls[0])["Msg"], denied.format(0))
            self.assertEqual(answer(pulls[-1])["Msg"], denied.format(dip.CACHE_ENTRIES))
            self.assertEqual(memory.bodies(), pulls[2:-1] + [pulls[0], pulls[-1]])
            self.assertEqual(decide.call_count, dip.CACHE_ENTRIES + 1)
            self.assertEqual(answer(pulls[1])["Msg"], denied.format(1))
            self.assertEqual((decide.call_count, len(memory)), (dip.CACHE_ENTRIES + 2, dip.CACHE_ENTRIES))
            self.assertNotIn(pulls[2], memory)
            # Bodies up to CACHE_BODY_MAX bytes are remembered, longer ones decided every time.
            for size, remembered in [(dip.CACHE_BODY_MAX, True), (dip.CACHE_BODY_MAX + 1, False)]:
                request = pull("/v1.41/images/create?fromImage=redis&tag=big")
                request["RequestHeaders"]["X-Padding"] = ""
                request["RequestHeaders"]["X-Padding"] = "x" * (size - len(json.dumps(request)))
                body = json.dumps(request).encode()
                self.assertEqual(len(body), size)
                calls = decide.call_count
                for _ in range(2):
                    self.assertEqual(answer(body)["Msg"], denied.format("big"))
                self.assertEqual((decide.call_count - calls, body in memory), (1 if remembered else 2, remembered))
            # A decision that asked the daemon what a name means is never remembered.
            docker = FakeDocker({"abcd": [dip.LocalImage("sha256:abcd" + "0" * 60, ("nginx:1",))]})
            plugin.docker = docker
            run = json.dumps(authz("POST", "/v1.41/containers/create", {"Image": "abcd"})).encode()
            calls = decide.call_count
            for _ in range(2):
                self.assertEqual(answer(run), {"Allow": True, "Msg": "", "Err": ""})
            self.assertEqual((decide.call_count - calls, docker.looked_up, run in memory), (2, ["abcd", "abcd"], False))
        # Remembered or not, every answer is logged and counted.
        pulls_asked = 2 * dip.CACHE_ENTRIES + 3 + 4
        self.assertEqual(len(self.fixture.log.getvalue().splitlines()), pulls_asked + 2)
        self.assertEqual(plugin.metrics.decisions, {("pull", "deny"): pulls_asked, ("run", "allow"): 2})

    def test_buffered_decision_log_keeps_order_and_delay(self):
        stream = Stream()
        log, flusher = buffered_log(self, stream, dip.LOG_FLUSH_INTERVAL)
        for number in range(1000):
            log.decision(decision_number(number), "deny", ENFORCE)
        last = time.monotonic()
        wait_for(lambda: stream.getvalue().count("\n") == 1000, "the decision lines")
        self.assertLess(time.monotonic() - last, dip.LOG_FLUSH_INTERVAL + 0.5)
        lines = [json.loads(line) for line in stream.getvalue().splitlines()]
        self.assertEqual([line["image"] for line in lines], [f"docker.io/library/redis:{n}" for n in range(1000)])
        self.assertEqual({thread for thread, _ in stream.writes}, {flusher})   # never the deciding thread
        # An event wakes the flush thread at once, and follows the decision lines still waiting.
        written = len(stream.writes)
        log.decision(decision_number(1000), "deny", ENFORCE)
        log.event("info", "reloaded")
        self.assertEqual(len(stream.writes), written)   # the calling thread never writes
        wait_for(lambda: stream.getvalue().endswith("reloaded\n"), "the event", timeout=dip.LOG_FLUSH_INTERVAL / 2)
        *_, waiting, event = stream.getvalue().splitlines()
        self.assertEqual((json.loads(waiting)["image"], event),
                         ("docker.io/library/redis:1000", "docker-image-policy: info: reloaded"))
        self.assertEqual({thread for thread, _ in stream.writes}, {flusher})

    def test_stalled_stderr_blocks_no_decision_and_drops_beyond_the_bound(self):
        stream = Stream()
        log, flusher = buffered_log(self, stream, 0.01)
        stream.open.clear()   # journald stops reading
        log.decision(decision_number(0), "deny", ENFORCE)
        self.assertTrue(stream.entered.wait(10))   # the flush thread is stuck writing it
        line = len(f'{{"time": "{dip._now()}", "decision": "deny", "mode": "enforce", "policy":'
                   f' "{ENFORCE.sha256[:12]}", {decision_number(100_000).log_fields}\n')
        kept = dip.MAX_PENDING_BYTES // line   # decisions 100000 on: every line has the same length
        extra = 7

        def decide() -> None:
            for number in range(100_000, 100_000 + kept + extra):
                log.decision(decision_number(number), "deny", ENFORCE)
            log.event("error", "internal error: " + "x" * line)   # events wait in the same bound, dropped alike
        deciding = threading.Thread(target=decide)
        deciding.start()
        deciding.join(20)
        self.assertFalse(deciding.is_alive(), "decisions waited for a stalled stderr")
        self.assertEqual(stream.writes, [])
        self.assertEqual((log.dropped_total, log.pending_bytes), (extra + 1, kept * line))
        stream.open.set()
        warning = f"docker-image-policy: warning: {extra + 1} log lines dropped while stderr did not keep up"
        wait_for(lambda: stream.getvalue().endswith(warning + "\n"), "the dropped-lines warning")
        lines = stream.getvalue().splitlines()
        self.assertEqual(len(lines), 1 + kept + 1)
        self.assertEqual([json.loads(line)["image"] for line in (lines[0], lines[1], lines[-2])],
                         [f"docker.io/library/redis:{n}" for n in (0, 100_000, 100_000 + kept - 1)])
        self.assertEqual({thread for thread, _ in stream.writes}, {flusher})
        self.assertEqual(log.dropped_total, extra + 1)   # since the start, for the metrics
        log.decision(decision_number(1), "deny", ENFORCE)   # taken again once stderr is
        wait_for(lambda: stream.getvalue().endswith('defaultAllow is false"}\n'), "a later decision")

    def test_internal_error_never_waits_on_a_stalled_stderr(self):
        stream = Stream()
        log, flusher = buffered_log(self, stream, 0.01)
        stream.open.clear()   # journald stops reading
        log.event("info", "started")
        self.assertTrue(stream.entered.wait(10))   # the flush thread is stuck writing it
        plugin = self.fixture.plugin
        plugin.log = log
        answers: list[dict[str, Any]] = []
        request = json.dumps(pull("/v1.41/images/create?fromImage=nginx&tag=1")).encode()

        def ask() -> None:
            answers.append(json.loads(plugin.authorize(request).partition(b"\r\n\r\n")[2]))
        with mock.patch.object(dip, "decide_pull", side_effect=KeyError("x" * 100_000)):
            asking = threading.Thread(target=ask)
            asking.start()
            asking.join(20)
        self.assertFalse(asking.is_alive(), "a request waited for a stalled stderr")
        self.assertEqual(answers, [{"Allow": False, "Err": "", "Msg": "request denied: internal error: KeyError('"
                                    + "x" * 190 + "… (100012 characters)"}])
        stream.open.set()
        wait_for(lambda: "internal error deciding a request" in stream.getvalue(), "the error line")
        self.assertEqual({thread for thread, _ in stream.writes}, {flusher})
        self.assertLess(max(len(line) for line in stream.getvalue().splitlines()), 1024)

    def test_closed_stderr_never_breaks_a_decision(self):
        closed = io.StringIO()
        closed.close()
        reader, writer = os.pipe()
        os.close(reader)
        broken = open(writer, "w")   # a pipe nobody reads: BrokenPipeError

        def close_broken() -> None:
            with contextlib.suppress(OSError):   # what it still holds cannot be written either
                broken.close()
        self.addCleanup(close_broken)
        for stream in (closed, broken):
            with self.subTest(stream):
                log = dip.Log("info", stream)
                log.event("error", "nowhere to go")
                log.decision(decision_number(1), "deny", ENFORCE)
                with mock.patch.object(sys, "stderr", stream):   # the daemon's Log writes to sys.stderr
                    dip.Log("info").event("error", "nowhere to go")
        self.fixture.plugin.log.stream = closed
        self.assertEqual(self.ask(pull("/v1.41/images/create?fromImage=redis&tag=7")), {
            "Allow": False, "Msg": "pull of redis:7 denied: no whitelist rule matches and defaultAllow is false",
            "Err": ""})
        self.assertTrue(self.ask(pull("/v1.41/images/create?fromImage=nginx&tag=1"))["Allow"])

    def test_message_for_users(self):
        self.fixture.write_config(dict(ORIGINAL_CONFIG, message="Approved images: https://wiki.example/images"))
        self.fixture.plugin.reload()
        self.assertEqual(self.ask(pull("/v1.41/images/create?fromImage=redis&tag=7"))["Msg"],
                         "pull of redis:7 denied: no whitelist rule matches and defaultAllow is false."
                         " Approved images: https://wiki.example/images")

    def test_check_command(self):
        result = run_module("--config", self.fixture.config_path, "--check", "nginx:1.25", "docker.io/library/nginx:1")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn("  canonical: docker.io/library/nginx:1.25\n  familiar:  nginx:1.25\n  decision:  allow\n"
                      '  rule:      whitelist[0] "^nginx:"\n', result.stdout)
        result = run_module("--config", self.fixture.config_path, "--check", "nginx:1", "ubuntu:22.04", "Bad")
        self.assertEqual(result.returncode, 1)
        self.assertIn('ubuntu:22.04\n  canonical: docker.io/library/ubuntu:22.04\n  familiar:  ubuntu:22.04\n'
                      '  decision:  deny\n  rule:      blacklist[0] "^ubuntu:"\n', result.stdout)
        self.assertIn("Bad\n  decision:  deny\n  reason:    invalid reference 'Bad'", result.stdout)
        self.fixture.write_config({"whitelist": ["("]})
        result = run_module("--config", self.fixture.config_path, "--check", "nginx")
        self.assertEqual(result.returncode, 2)
        self.assertIn('"whitelist"[0]: invalid regular expression "(":', result.stderr)

    def test_check_command_speaks_every_operation(self):
        config = self.fixture.config_path
        result = run_module("--config", config, "--check", "nginx:1", "redis:7", "--operation", "tag",
                            "--tag-target", "quay.io/calico/node:v3")
        self.assertEqual(result.returncode, 1, result.stderr)
        self.assertEqual(result.stdout, 'nginx:1\n  operation: tag\n  canonical: quay.io/calico/node:v3\n'
                         '  familiar:  nginx:1 as quay.io/calico/node:v3\n  decision:  allow\n'
                         '  rule:      whitelist[2] "^quay\\\\.io/calico/node"\n'
                         '  reason:    whitelist rule "^quay\\\\.io/calico/node" matches for the new name\n'
                         'redis:7\n  operation: tag\n  canonical: docker.io/library/redis:7\n  familiar:  redis:7\n'
                         '  decision:  deny\n  rule:      defaultAllow\n'
                         '  reason:    no whitelist rule matches and defaultAllow is false\n')
        for operation, image, expected in [
            ("pull-all-tags", "nginx", ("pull (all tags)", "allow", 'whitelist[0] "^nginx:"')),
            ("pull-all-tags", "ubuntu", ("pull (all tags)", "deny", "all-tags")),
            ("run", "ubuntu:22.04", ("run", "deny", 'blacklist[0] "^ubuntu:"')),
            ("service", "nginx:1@" + DIGEST, ("service", "allow", 'whitelist[0] "^nginx:"')),
            ("plugin-install", "docker:24", ("plugin install", "allow", 'whitelist[1] "^docker:"')),
            ("run", "3f9a", ("run", "deny", "image-id")),   # no --docker-host: an ID cannot be judged
        ]:
            with self.subTest(operation=operation, image=image):
                result = run_module("--config", config, "--check", image, "--operation", operation, "--format", "json")
                (answer,) = json.loads(result.stdout)
                self.assertEqual((answer["operation"], answer["decision"], answer["rule"]), expected)
                self.assertEqual(result.returncode, 0 if expected[1] == "allow" else 1)
        self.assertIn("give --docker-host to judge it", answer["reason"])

    def test_check_run_by_image_id_asks_the_daemon(self):
        docker = TestDockerAPI.stand_in(self, dict(SCANNED_HOST, **{f"/images/{SMUGGLED_ID}/json": (200, {
            "Id": SMUGGLED_ID, "RepoTags": ["smuggled:1", "nginx:smuggled"], "RepoDigests": []})}))
        for image, allow, reason in [
            (SMUGGLED_ID, True, 'whitelist rule "^nginx:" matches for its name nginx:smuggled'),
            ("3333", False, f"image {NAMELESS_ID[:19]} has no repository name or digest the policy could allow"),
            ("smuggled:1", False, NO_RULE)]:
            with self.subTest(image):
                result = run_module("--config", self.fixture.config_path, "--check", image, "--operation", "run",
                                    "--docker-host", docker.host, "--format", "json")
                (answer,) = json.loads(result.stdout)
                self.assertEqual((answer["decision"], answer["reason"]), ("allow" if allow else "deny", reason))

    def test_validate_runs_the_policys_tests(self):
        tests = [{"image": "nginx:1.25", "expect": "allow"}, {"image": "ubuntu:22.04", "expect": "deny"},
                 {"image": "nginx", "operation": "pull-all-tags", "expect": "allow"}]
        self.fixture.write_config(dict(ORIGINAL_CONFIG, tests=tests))
        result = run_module("--config", self.fixture.config_path, "--validate")
        self.assertEqual((result.returncode, result.stdout.splitlines()[-2:]), (0, [
            f"{self.fixture.config_path}: all 3 tests pass",
            f"{self.fixture.config_path}: valid, 3 whitelist and 1 blacklist rules, mode enforce"]))
        self.fixture.write_config(dict(ORIGINAL_CONFIG, tests=tests + [
            {"image": "redis:7", "expect": "allow", "note": "the cache"}]))
        result = run_module("--config", self.fixture.config_path, "--validate")
        failure = ('"tests"[3] (pull of redis:7): expected allow, but pull of redis:7 denied: no whitelist rule matches'
                   ' and defaultAllow is false [defaultAllow] (the cache)')
        self.assertEqual((result.returncode, result.stdout.splitlines()[-1] + "\n", result.stderr), (
            2, f"fail: {failure}\n",
            f'docker-image-policy: error: {self.fixture.config_path}: "tests": 1 of 4 tests fail: {failure}\n'))

    def test_daemon_and_reload_refuse_a_policy_whose_tests_fail(self):
        failing = dict(ORIGINAL_CONFIG, tests=[{"image": "redis:7", "expect": "allow"}])
        error = (f'{self.fixture.config_path}: "tests": 1 of 1 tests fail: "tests"[0] (pull of redis:7): expected'
                 f' allow, but pull of redis:7 denied: {NO_RULE} [defaultAllow]')
        self.fixture.write_config(failing)
        self.assertFalse(self.fixture.plugin.reload())
        self.assertIn(f"reload failed, the running policy stays in force: {error}\n", self.fixture.log.getvalue())
        self.assertFalse(self.ask(pull("/v1.41/images/create?fromImage=redis&tag=7"))["Allow"])
        self.assertTrue(self.ask(pull("/v1.41/images/create?fromImage=nginx&tag=7"))["Allow"])
        result = run_module("--config", self.fixture.config_path, "--socket", self.fixture.dir + "/x.sock")
        self.assertEqual((result.returncode, result.stderr), (2, f"docker-image-policy: error: {error}\n"))
        self.assertFalse(os.path.lexists(self.fixture.dir + "/x.sock"))
        self.fixture.write_config(dict(failing, whitelist=["^redis:"]))
        self.assertTrue(self.fixture.plugin.reload())
        self.assertTrue(self.ask(pull("/v1.41/images/create?fromImage=redis&tag=7"))["Allow"])

    def test_scan_command(self):
        docker = TestDockerAPI.stand_in(self, SCANNED_HOST)
        result = run_module("--config", self.fixture.config_path, "--scan", "--docker-host", docker.host)
        self.assertEqual(result.returncode, 1, result.stderr)
        lines = result.stdout.splitlines()
        self.assertEqual(lines[0], f"image smuggled:1 (222222222222): pull of smuggled:1 denied: {NO_RULE}"
                                   " [defaultAllow]")
        self.assertEqual(lines[2], f"container old (c2c2c2c2c2c2): run of smuggled:1 denied: {NO_RULE} [defaultAllow]")
        self.assertEqual(lines[-1], f"6 refused of 12 judged: 3 images, 4 containers, 3 services; policy"
                                    f" {self.fixture.config_path}, mode enforce")
        result = run_module("--config", self.fixture.config_path, "--scan", "--docker-host", docker.host,
                            "--format", "json")
        document = json.loads(result.stdout)
        self.assertEqual(document["scanned"], {"images": 3, "containers": 4, "services": 3})
        # What a fleet's scans are merged by: the host, the policy's hash and the time.
        self.assertEqual((document["host"], document["policySha256"]),
                         (socket.gethostname(), self.fixture.plugin.policy.sha256))
        self.assertLess(abs(time.time() - calendar.timegm(time.strptime(document["time"], "%Y-%m-%dT%H:%M:%SZ"))), 60)
        self.assertEqual(document["refused"][4], {"kind": "service", "id": "s2", "name": "miner",
                                                  "operation": "service", "image": "docker.io/evil/miner:1",
                                                  "rule": "defaultAllow", "reason": NO_RULE})
        clean = TestDockerAPI.stand_in(self, {
            "/images/json?all=1": (200, [{"Id": NGINX_ID, "RepoTags": ["nginx:1.25"], "RepoDigests": []}]),
            "/containers/json?all=1": (200, []), "/services": (503, {"message": "This node is not a swarm manager."})})
        result = run_module("--config", self.fixture.config_path, "--scan", "--docker-host", clean.host)
        self.assertEqual((result.returncode, result.stdout), (0, "0 refused of 1 judged: 1 image, 0 containers,"
                         f" no services (not a swarm manager); policy {self.fixture.config_path}, mode enforce\n"))
        result = run_module("--config", self.fixture.config_path, "--scan", "--docker-host",
                            f"unix://{self.fixture.dir}/none.sock")
        self.assertEqual((result.returncode, result.stdout, result.stderr), (2, "", "docker-image-policy: error:"
                         f" cannot scan: Docker API at unix://{self.fixture.dir}/none.sock: [Errno 2] No such file or"
                         " directory\n"))

    def test_replay_of_a_decision_log(self):
        requests = [
            pull("/v1.41/images/create?fromImage=nginx&tag=1.25"),
            pull("/v1.41/images/create?fromImage=docker.io%2Flibrary%2Fnginx&tag=1.25"),   # CLI 28 spelling
            pull("/v1.41/images/create?fromImage=redis&tag=7"),
            pull("/v1.41/images/create?fromImage=ubuntu&tag=22.04"),
            pull("/v1.41/images/create?fromImage=nginx"),                                    # every tag
            authz("POST", "/v1.41/containers/create", {"Image": "nginx:1"}),
            pull("/v1.41/images/nginx:1/tag?repo=quay.io/calico/node&tag=x"),
            authz("POST", "/v1.41/images/load", headers={"Content-Type": "application/x-tar"}),
            authz("POST", "/v1.41/containers/create", {"Image": "sha256:" + "b" * 64}),   # resolved at the time
            authz("POST", "/v1.41/containers/create", headers={"Content-Type": "application/json"}),   # no body
        ]
        for request in requests:
            self.ask(request)
        log = Path(self.fixture.dir, "decisions.log")
        log.write_text(self.fixture.log.getvalue() + "docker-image-policy: info: reloaded\n")
        candidate = Path(self.fixture.dir, "candidate.json")
        candidate.write_text(json.dumps({"whitelist": ["^redis:", "^quay\\.io/"], "blacklist": ["^nginx:1\\.25"],
                                         "allowLoad": True}))
        result = run_module("--config", str(candidate), "--replay", str(log))
        self.assertEqual(result.returncode, 1, result.stderr)
        times = [json.loads(line)["time"] for line in self.fixture.log.getvalue().splitlines()]
        first, last = min(times), max(times)
        self.assertEqual(result.stdout.splitlines(), [
            'nginx:1: allow -> deny, 2 times (run 1, tag 1): no whitelist rule matches and defaultAllow is false'
            ' [defaultAllow]',
            'nginx:1.25: allow -> deny, 2 times (pull 2): blacklist rule "^nginx:1\\\\.25" matches'
            ' [blacklist[0] "^nginx:1\\\\.25"]',
            "load: deny -> allow, 1 time (load 1): 'allowLoad' is true; the plugin cannot see which images the archive"
            " holds [allowLoad]",
            "nginx: allow -> deny, 1 time (pull (all tags) 1): a pull of all tags is allowed only when a whitelist"
            " rule of the form ^prefix covers every tag; pull a tag or digest instead [all-tags]",
            'redis:7: deny -> allow, 1 time (pull 1): whitelist rule "^redis:" matches [whitelist[0] "^redis:"]',
            f"log {log}: decisions from {first} to {last}; hosts: not named in the log (journalctl -o cat leaves"
            " them out; -o short-iso and -o json keep them)",
            f"10 decisions replayed under {candidate}: 7 would change (5 allow -> deny, 2 deny -> allow) on 5 images,"
            " 1 unchanged; not decided again: 1 a request that could not be read, 1 an image ID resolved at the"
            " time; 1 other lines"])
        self.assertEqual(run_module("--config", self.fixture.config_path, "--replay", str(log)).stdout.splitlines()[1:],
                         [f"10 decisions replayed under {self.fixture.config_path}: 0 would change (0 allow -> deny,"
                          " 0 deny -> allow) on 0 images, 8 unchanged; not decided again: 1 a request that could not"
                          " be read, 1 an image ID resolved at the time; 1 other lines"])
        result = run_module("--config", str(candidate), "--replay", "-", "--format", "json", input=log.read_text())
        document = json.loads(result.stdout)
        self.assertEqual(document["changes"][-1], {"image": "redis:7", "was": "deny", "now": "allow", "count": 1,
                                                   "operations": {"pull": 1}, "rule": 'whitelist[0] "^redis:"',
                                                   "reason": 'whitelist rule "^redis:" matches'})
        self.assertEqual(document["summary"], {"decisions": 10, "changed": 7, "allowToDeny": 5, "denyToAllow": 2,
                                               "notReplayable": {"a request that could not be read": 1,
                                                                 "an image ID resolved at the time": 1},
                                               "otherLines": 1, "onlyDenies": False, "from": first, "to": last,
                                               "hosts": {}})
        result = run_module("--config", str(candidate), "--replay", str(log) + ".missing")
        self.assertEqual(result.returncode, 2)
        self.assertIn("cannot read the decision log: [Errno 2] No such file or directory", result.stderr)

    def test_replay_says_what_it_could_not_read(self):
        candidate = Path(self.fixture.dir, "candidate.json")
        candidate.write_text(json.dumps({"defaultAllow": False}))   # denies everything
        empty = Path(self.fixture.dir, "empty.log")
        empty.write_text("")
        noise = Path(self.fixture.dir, "noise.log")
        noise.write_text("-- No entries --\ndocker-image-policy: info: reloaded\n{\"MESSAGE\": null}\n{not json\n")
        for log, lines in [(empty, 0), (noise, 4)]:
            for output in ("text", "json"):
                with self.subTest(log=log.name, output=output):
                    result = run_module("--config", str(candidate), "--replay", str(log), "--format", output)
                    self.assertEqual((result.returncode, result.stdout), (2, ""))
                    self.assertEqual(result.stderr, f"docker-image-policy: error: no decision read from {log}"
                                     f" ({lines} other lines): expected the plugin's decision log as it wrote it or as"
                                     " journalctl -o cat, -o short-iso or -o json exports it\n")
        # The README's options file keeps denies only: a candidate that denies everything changes none of them.
        stream = io.StringIO()
        log = dip.Log("info", stream, decisions="denies")
        policy = policy_of(ORIGINAL_CONFIG)
        for image in ("nginx:1", "redis:7", "nginx:2"):
            decision = dip.judge(policy, dip.PULL, image)
            log.decision(decision, "allow" if decision.allow else "deny", policy)
        denies = Path(self.fixture.dir, "denies.log")
        denies.write_text(stream.getvalue())
        result = run_module("--config", str(candidate), "--replay", str(denies))
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(result.stdout.splitlines()[0], f"note: {dip.ONLY_DENIES}")
        self.assertIn("1 decisions replayed", result.stdout)
        result = run_module("--config", str(candidate), "--replay", str(denies), "--format", "json")
        self.assertTrue(json.loads(result.stdout)["summary"]["onlyDenies"])

    def test_replay_reads_journald_exports(self):
        # The lines as journalctl prints them (see journal_exports for a real journal made from them).
        decision = '{"time": "2026-12-01T10:00:00Z", "decision": "allow", "mode": "enforce", "policy": "0a",' \
                   ' "operation": "pull", "image": "docker.io/library/nginx:1"}'
        later = decision.replace("10:00:00", "11:30:00").replace("nginx:1", "nginx:2")
        exports = {
            "cat": [decision, "docker-image-policy: info: reloaded", later],
            "short-iso": [f"2026-12-01T10:00:00+0000 web-1 docker-image-policy[42]: {decision}",
                          "2026-12-01T10:00:01+00:00 web-1 docker-image-policy[42]: docker-image-policy: info: x",
                          f"2026-12-01T11:30:00+00:00 web-2 docker-image-policy[7]: {later}"],
            "short": [f"Dec 01 10:00:00 web-1 docker-image-policy[42]: {decision}", "-- Boot 0123 --",
                      f"Dec 01 11:30:00 web-2 docker-image-policy[7]: {later}"],
            "json": [json.dumps({"_HOSTNAME": "web-1", "PRIORITY": "6", "MESSAGE": decision}),
                     json.dumps({"_HOSTNAME": "web-1", "MESSAGE": None}),
                     json.dumps({"_HOSTNAME": "web-2", "MESSAGE": list(later.encode())})],   # as journalctl writes non-UTF-8
        }
        policy = policy_of({"whitelist": ["^nginx:1$"]})
        for export, lines in exports.items():
            with self.subTest(export):
                replay = dip.replay_log(policy, [line + "\n" for line in lines])
                self.assertEqual((replay.decisions, replay.other_lines, replay.changed), (2, 1, 1))
                self.assertEqual((replay.first, replay.last), ("2026-12-01T10:00:00Z", "2026-12-01T11:30:00Z"))
                self.assertEqual(replay.hosts, {} if export == "cat" else {"web-1": 1, "web-2": 1})

    def test_replay_decides_each_operation_as_a_request(self):
        audit = policy_of({"whitelist": ["^nginx:"], "mode": "audit"})
        plugin_log = io.StringIO()
        log = dip.Log("info", plugin_log)
        docker = FakeDocker({"3f9a": [dip.LocalImage("sha256:3f9a1", ("nginx:1",))]})
        for request in [pull("/v1.41/images/create?fromImage=DOCKER.IO%2Fnginx&tag=1"),
                        authz("POST", "/v1.41/containers/create", {"Image": "3f9a"}),
                        authz("POST", "/v1.41/plugins/pull?remote=nginx:2", []),
                        authz("POST", "/v1.41/services/create", {"TaskTemplate": {"ContainerSpec": {"Image": "nginx:3"}}}),
                        authz("POST", "/v1.41/build")]:
            decision = dip.decide(audit, request, docker)
            log.decision(decision, "allow" if decision.allow else "would-deny", audit)
        lines = plugin_log.getvalue().splitlines()
        replayed = lambda policy: [(decision.allow, decision.rule) for decision in (
            dip.replay_decision(policy, json.loads(line)) for line in lines if '"name"' not in line)]
        # DOCKER.IO/nginx is not the official nginx: the canonical form in the log keeps it apart.
        self.assertEqual(replayed(policy_of({"whitelist": ["^nginx:"], "allowBuild": True})), [
            (False, "defaultAllow"), (True, 'whitelist[0] "^nginx:"'), (True, 'whitelist[0] "^nginx:"'),
            (True, "allowBuild")])
        self.assertEqual(replayed(policy_of({"whitelist": ["^docker\\.io/nginx:"]}))[0],
                         (True, 'whitelist[0] "^docker\\\\.io/nginx:"'))
        with self.assertRaisesRegex(dip.NotReplayable, "an image ID resolved at the time"):
            dip.replay_decision(audit, json.loads(lines[1]))
        replay = dip.replay_log(policy_of({"defaultAllow": True}), lines)
        self.assertEqual((replay.decisions, replay.changed), (5, 2))   # the audit's would-deny lines now allowed


        self.fixture.write_config({"whitelist": ["^quay\\.io/", "nginx"], "blacklist": ["^quay\\.io/bad"],
                                   "checkRun": True})
        result = run_module("--config", self.fixture.config_path, "--validate")
        self.assertEqual(result.returncode, 0)
        self.assertEqual(result.stdout.splitlines(), [
            'warning: whitelist[1] "nginx": not anchored with ^ (or $), so it matches anywhere in an image name',
            'warning: blacklist[0] "^quay\\\\.io/bad" is unreachable: whitelist[0] "^quay\\\\.io/" allows'
            ' everything it matches first',
            f"{self.fixture.config_path}: valid, 2 whitelist and 1 blacklist rules, mode enforce"])
        self.fixture.write_config({"whitelist": [1]})
        result = run_module("--config", self.fixture.config_path, "--validate")
        self.assertEqual((result.returncode, result.stderr.strip()), (2, f'docker-image-policy: error:'
                         f' {self.fixture.config_path}: "whitelist"[0]: must be a string, not 1'))

    def test_a_go_era_file_is_explained_and_audit_mode_comes_from_the_command_line(self):
        config = self.fixture.config_path
        Path(config).write_text(ORIGINAL_README_CONFIG)
        result = run_module("--config", config, "--validate")
        self.assertEqual((result.returncode, result.stderr), (0, ""))
        explained = [line for line in result.stdout.splitlines() if "only the Go plugin's keys" in line]
        self.assertEqual(len(explained), 1, result.stdout)
        self.assertIn("(false: build, commit, import, load, plugin create, swarm are refused)", explained[0])
        restore = ('add "checkRun": false, "allowBuild": true, "allowCommit": true, "allowLoad": true,'
                   ' "allowPluginCreate": true, "allowSwarm": true (services and plugin installs stay judged by name)')
        self.assertIn(restore, explained[0])
        # With those keys, every operation the Go plugin let through is allowed again, and imports stay refused.
        keys = json.loads("{" + restore[4:restore.index(" (")] + "}")
        Path(config).write_text(ORIGINAL_README_CONFIG.replace('"defaultAllow": false', '"defaultAllow": false, '
                                                               + json.dumps(keys)[1:-1]))
        result = run_module("--config", config, "--validate")
        self.assertNotIn("only the Go plugin's keys", result.stdout)
        policy = dip.load_policy(config)
        for operation, image, allow in [("run", "evil/miner:1", True), ("tag", "evil/miner:1", True),
                                        ("build", "", True), ("load", "", True), ("commit", "", True),
                                        ("import", "", False), ("pull", "evil/miner:1", False),
                                        ("pull", "nginx:1.25", True)]:
            with self.subTest(operation=operation):
                target = "evil/other:1" if operation == "tag" else ""
                self.assertEqual(dip.judge(policy, dip.COMMANDS[operation], image, target).allow, allow)
        # --mode overrides the file's mode wherever the file is read: the daemon, --check, --validate.
        Path(config).write_text(ORIGINAL_README_CONFIG)
        result = run_module("--config", config, "--mode", "audit", "--check", "redis:7")
        self.assertEqual(result.returncode, 1)
        self.assertIn("decision:  deny (audit mode: logged as would-deny and allowed)", result.stdout)
        self.assertTrue(run_module("--config", config, "--mode", "audit", "--validate").stdout.endswith(
            ", mode audit\n"))
        plugin = dip.Plugin(config, dip.load_tested_policy,
                            dip.Log("info", io.StringIO()), dip.DockerAPI("unix:///nonexistent"), "audit")
        self.assertEqual((plugin.policy.mode, plugin.status()["mode"], plugin.status()["modeFrom"]), ("audit",) * 2
                         + ("--mode",))
        Path(config).write_text(json.dumps({"mode": "enforce"}))
        self.assertTrue(plugin.reload())
        self.assertEqual((plugin.policy.mode, plugin.status()["modeFrom"]), ("audit", "--mode"))
        self.assertIn('mode="audit"', plugin.metrics_text())
        unset = dip.Plugin(config, dip.load_tested_policy,
                           dip.Log("info", io.StringIO()), dip.DockerAPI("unix:///nonexistent"))
        self.assertEqual((unset.policy.mode, unset.status()["modeFrom"]), ("enforce", "policy"))
        Path(config).write_text("{}")
        self.assertTrue(unset.reload())
        self.assertEqual((unset.policy.mode, unset.status()["modeFrom"]), ("enforce", "default"))

    def test_check_judges_every_operation_and_says_one_test_passes(self):
        config = self.fixture.config_path
        self.fixture.write_config({"allowLoad": True, "tests": [{"operation": "load", "expect": "allow"}]})
        for operation, status, word in [("build", 1, "deny"), ("load", 0, "allow"), ("swarm", 1, "deny")]:
            with self.subTest(operation):
                result = run_module("--config", config, "--check", "--operation", operation)
                self.assertEqual((result.returncode, result.stdout.splitlines()[0]), (status, operation))
                self.assertIn(f"  decision:  {word}\n", result.stdout)
        self.assertEqual(run_module("--config", config, "--validate").stdout.splitlines()[0],
                         f"{config}: the test passes")
        self.assertEqual(run_module("--config", config, "--check", "nginx:1", "--log-level", "DEBUG").returncode, 1)

    def test_validate_strict_fails_on_any_warning(self):
        config = self.fixture.config_path
        self.fixture.write_config({"whitelist": ["^nginx", "^registry.example.com/"], "blacklist": [":latest$"],
                                   "checkRun": True})
        expected = [
            'warning: whitelist[0] "^nginx": allows nginxevil/miner, another name that begins with nginx; end the'
            ' name, e.g. ^nginx:[^/]*$ for its tags and digests, or ^nginx/ for the repositories under it',
            'warning: whitelist[1] "^registry.example.com/": allows registry-example.com/evil/miner: an unescaped .'
            ' matches any character; escape the dots: ^registry\\.example\\.com/',
            'warning: blacklist[0] ":latest$" can never change a decision: defaultAllow is false, so what no'
            ' whitelist rule allows is denied anyway, and what one allows is allowed whatever the blacklist says:'
            ' nginx:latest is allowed by whitelist[0] "^nginx"; narrow that rule so that it does not allow'
            ' nginx:latest, e.g. with a lookahead (?!…), and remove this one',
            f"{config}: valid, 2 whitelist and 1 blacklist rules, mode enforce"]
        for strict, status in [((), 0), (("--strict",), 1)]:
            with self.subTest(strict=strict):
                result = run_module("--config", config, "--validate", *strict)
                self.assertEqual((result.returncode, result.stdout.splitlines(), result.stderr), (status, expected, ""))
        self.fixture.write_config({"whitelist": ["^nginx:[^/]*$", "^registry\\.example\\.com/"], "checkRun": True})
        result = run_module("--config", config, "--validate", "--strict")
        self.assertEqual((result.returncode, result.stdout), (0, f"{config}: valid, 2 whitelist and 0 blacklist"
                                                                 " rules, mode enforce\n"))
        self.fixture.write_config({"whitelist": ["^nginx:("]})
        result = run_module("--config", config, "--validate", "--strict")
        self.assertEqual(result.returncode, 2)
        self.assertIn('"whitelist"[0]: invalid regular expression "^nginx:(":', result.stderr)

    def test_nested_repetition_loads_quietly_and_decides_quickly(self):
        # Once a warning at start and reload; now such a rule is matched in linear time, as the Go plugin matched it.
        self.fixture.write_config({"whitelist": ["^nginx:[^/]*$", "^([a-z0-9]+[._-]?)*:1\\."]})
        self.assertTrue(self.fixture.plugin.reload())
        self.assertTrue(self.fixture.log.getvalue().endswith(" 2 whitelist and 0 blacklist rules, mode enforce\n"),
                        self.fixture.log.getvalue())
        stream = io.StringIO()
        plugin = dip.Plugin(self.fixture.config_path, dip.load_tested_policy,
                            dip.Log("info", stream), dip.DockerAPI("unix:///nonexistent"))
        self.assertEqual(stream.getvalue(), "")
        started = time.perf_counter()
        verdict = plugin.current.policy.evaluate(parse_reference("a" * 230 + "b:1.0"))
        self.assertLess(time.perf_counter() - started, 0.1)
        self.assertEqual(verdict.rule, 'whitelist[1] "^([a-z0-9]+[._-]?)*:1\\\\."')

    def test_daemon_refuses_bad_config_with_status_2(self):
        self.fixture.write_config({"defaultAllow": "no"})
        result = run_module("--config", self.fixture.config_path, "--socket", self.fixture.dir + "/x.sock")
        self.assertEqual(result.returncode, 2)
        self.assertEqual(result.stderr, f'docker-image-policy: error: {self.fixture.config_path}:'
                                        f' "defaultAllow": must be true or false, not "no"\n')
        self.assertFalse(os.path.lexists(self.fixture.dir + "/x.sock"))
        result = run_module("--config", self.fixture.dir + "/missing.json")
        self.assertEqual(result.returncode, 2)
        self.assertIn("missing.json: cannot read the configuration", result.stderr)

    def test_daemon_exits_1_when_it_cannot_listen(self):
        directory = self.fixture.dir
        regular = os.path.join(directory, "file.sock")
        Path(regular).write_text("keep me")
        long_path = os.path.join(directory, "x" * 120 + ".sock")
        for path, error in [
            (regular, f"cannot serve the plugin socket {regular}: {regular} exists and is not a socket;"
                      " refusing to replace it"),
            (os.path.join(regular, "p.sock"), f"cannot serve the plugin socket {regular}/p.sock: [Errno 17] File"
                                              f" exists: '{regular}'"),
            (long_path, f"cannot serve the plugin socket {long_path}: AF_UNIX path too long"),
        ]:
            with self.subTest(path):
                result = run_module("--config", self.fixture.config_path, "--socket", path, "--addr", "127.0.0.1:0")
                self.assertEqual((result.returncode, result.stderr), (1, f"docker-image-policy: error: {error}\n"))
        self.assertEqual(Path(regular).read_text(), "keep me")

    def test_taken_admin_address_leaves_the_plugin_serving(self):
        sock = os.path.join(self.fixture.dir, "d.sock")
        taken = socket.socket()   # an admin address another process listens on, and answers
        self.addCleanup(taken.close)
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        address = f"127.0.0.1:{taken.getsockname()[1]}"
        squatter = threading.Thread(target=answer_healthy, args=(taken,), daemon=True)
        squatter.start()
        stderr = Path(self.fixture.dir) / "stderr"
        with open(stderr, "w") as output:
            daemon = subprocess.Popen([sys.executable, str(MODULE), "--config", self.fixture.config_path,
                                       "--socket", sock, "--addr", address], stderr=output)
        self.addCleanup(stop_processes, [daemon])
        wait_for(lambda: os.path.exists(sock), "the plugin socket")
        with socket.socket(socket.AF_UNIX) as plugin:   # dockerd's handshake and a decision
            plugin.connect(sock)
            self.assertEqual(exchange(plugin, post("/Plugin.Activate", b""))[2], b'{"Implements": ["authz"]}')
            request = json.dumps(pull("/v1.41/images/create?fromImage=redis&tag=7")).encode()
            self.assertFalse(json.loads(exchange(plugin, post("/AuthZPlugin.AuthZReq", request))[2])["Allow"])
        self.assertEqual(http_get(address, "/health"), "HEALTHY")   # the squatter's answer
        health = run_module("--health", "--socket", sock)
        self.assertEqual(health.returncode, 1, health.stdout)
        self.assertRegex(health.stdout, rf"^unhealthy: the plugin answers on {re.escape(sock)} \(policy \w{{12}},"
                                        rf" enforce\), but its admin listener is not bound on {address} after \d+"
                                        r" failed binds \(\[Errno 98\] Address already in use\): another process may"
                                        r" hold the address\n$")
        wait_for(lambda: "error: cannot listen" in stderr.read_text(), "the error")
        self.assertIn(f"docker-image-policy: error: cannot listen on {address}: [Errno 98] Address already in use;"
                      " the plugin socket serves dockerd, and the admin listener is retried every 2 s\n",
                      stderr.read_text())
        self.assertIn(f"admin listener not bound on {address} (retrying), policy", stderr.read_text())
        taken.shutdown(socket.SHUT_RDWR)   # the squatter leaves (wakes its accept()): the plugin takes its address
        taken.close()
        squatter.join(10)
        wait_for(lambda: run_module("--health", "--socket", sock).returncode == 0, "the admin listener")
        self.assertRegex(run_module("--health", "--socket", sock).stdout,
                         rf"^healthy: the plugin answers on .*; its admin listener is on {address}\n$")
        status = json.loads(http_get(address, "/status"))
        self.assertEqual((status["admin"]["address"], status["admin"]["listening"]), (address, True))
        self.assertGreaterEqual(status["admin"]["failedBinds"], 1)
        self.assertIn("Address already in use", status["admin"]["lastError"])
        failures = re.search(r"^docker_image_policy_admin_bind_failures_total (\d+)$", http_get(address, "/metrics"),
                             re.M)
        self.assertEqual(int(failures[1]), status["admin"]["failedBinds"])
        wait_for(lambda: "info: admin listener on" in stderr.read_text(), "the info line")
        daemon.terminate()
        self.assertEqual(daemon.wait(20), 0)
        self.assertFalse(os.path.lexists(sock))
        self.assertNotIn("Traceback", stderr.read_text())

    def test_health_check_is_not_fooled_by_another_listener(self):
        # The plugin says it listens on an address where something else answers (as
        # if the plugin's own listener were gone): --health compares its instance.
        impostor = socket.socket()
        self.addCleanup(impostor.close)
        impostor.bind(("127.0.0.1", 0))
        impostor.listen()
        threading.Thread(target=answer_healthy, args=(impostor,), daemon=True).start()
        plugin = self.fixture.plugin
        plugin.admin.address = f"127.0.0.1:{impostor.getsockname()[1]}"
        with contextlib.redirect_stdout(io.StringIO()) as output:
            self.assertEqual(dip.main(["--health", "--socket", self.fixture.socket_path]), 1)
        self.assertRegex(output.getvalue(), rf"^unhealthy: the plugin answers on .*, but the admin listener on"
                                            rf" {plugin.admin.address} is not the plugin's\n$")
        plugin.admin.address = self.fixture.admin.name()
        with contextlib.redirect_stdout(io.StringIO()) as output:
            self.assertEqual(dip.main(["--health", "--socket", self.fixture.socket_path]), 0)
        self.assertRegex(output.getvalue(), r"^healthy: the plugin answers on .* \(policy \w{12}, enforce\); its admin"
                                            rf" listener is on 127.0.0.1:{self.fixture.admin.server_address[1]}\n$")
        with contextlib.redirect_stdout(io.StringIO()) as output:
            self.assertEqual(dip.main(["--health", "--socket", os.path.join(self.fixture.dir, "none.sock")]), 1)
        self.assertRegex(output.getvalue(), r"^unhealthy: the plugin socket .*none.sock does not answer: \[Errno 2\]")

    def test_admin_listener_on_a_unix_socket_for_root_only(self):
        path = os.path.join(self.fixture.dir, "admin", "admin.sock")
        admin = dip.AdminServer(dip.parse_addr(f"unix:{path}"), self.fixture.plugin)
        thread = threading.Thread(target=admin.serve_forever, args=(0.05,))
        thread.start()

        def stop() -> None:
            admin.shutdown()
            admin.server_close()
            thread.join()
        self.addCleanup(stop)
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
        self.assertEqual(self.fixture.plugin.admin.address, f"unix:{path}")
        self.assertEqual(dip.admin_status(f"unix:{path}")["instance"], self.fixture.plugin.instance)
        with contextlib.redirect_stdout(io.StringIO()) as output:
            self.assertEqual(dip.main(["--health", "--socket", self.fixture.socket_path]), 0)
        self.assertIn(f"its admin listener is on unix:{path}\n", output.getvalue())
        with self.assertRaisesRegex(dip.ImagePolicyError, "another process is already serving"):
            dip.AdminServer(path, self.fixture.plugin)
        stop()
        self.assertFalse(os.path.lexists(path))   # removed on close

    def test_command_line_errors(self):
        config = self.fixture.config_path
        for argv, message in [
            (["--check", "nginx", "--validate"], "--check and --validate cannot be combined"),
            (["--scan", "--replay", "-"], "--scan and --replay cannot be combined"),
            (["--scan", "--operation", "run"], "--operation, --tag-target, --caller and --at go with --check"),
            (["--check"], "--check needs at least one IMAGE"),
            (["--check", "nginx", "--operation", "build"], "--check: a build names no image"),
            (["--check", "nginx", "--caller", "team-a"], "--caller: a caller is cn:NAME, o:NAME, ou:NAME (several"
                                                         " together) or unidentified, not 'team-a'"),
            (["--check", "nginx", "--at", "tomorrow"], "--at: expected a date (2027-01-31) or an RFC 3339 time with"
                                                       " its zone, not 'tomorrow'"),
            (["--check", "nginx", "--operation", "tag"], "--tag-target NAME goes with --operation tag, and"
                                                         " --operation tag needs it"),
            (["--check", "nginx", "--tag-target", "x"], "--tag-target NAME goes with --operation tag, and"
                                                        " --operation tag needs it"),
            (["--validate", "--format", "json"], "--format goes with --check, --scan or --replay"),
            (["--strict"], "--strict is valid only with --validate"),
            (["--check", "nginx", "--strict"], "--strict is valid only with --validate"),
            (["--addr", "5006"], "--addr: expected HOST:PORT or unix:PATH, not '5006'"),
            (["--addr", "127.0.0.1:http"], "--addr: expected HOST:PORT or unix:PATH, not '127.0.0.1:http'"),
            (["--addr", "unix:admin.sock"], "--addr: expected unix:/ABSOLUTE/PATH, not 'unix:admin.sock'"),
            (["--health", "--check", "nginx"], "--check and --health cannot be combined"),
            (["--docker-host", "ssh://docker"], "--docker-host: expected unix://PATH or tcp://HOST:PORT,"
                                                " not 'ssh://docker'"),
            (["--docker-host", "/var/run/docker.sock"], "--docker-host: expected unix://PATH or tcp://HOST:PORT,"
                                                        " not '/var/run/docker.sock'"),
            (["--colour"], "unrecognized arguments: --colour"),
            (["--addr", "127.0.0.1:99999"], "--addr: port 99999 is out of range (0 to 65535; 0 picks a free one)"),
            (["--log-decisions", "some"], "argument --log-decisions: invalid choice: 'some' (choose from 'all',"
                                          " 'denies', 'none')"),
            (["--validate", "--registry-auth", "auth.json"], "--registry-auth goes with serving, --check or --scan:"
                                                             " the others ask no registry"),
        ]:
            with self.subTest(argv), mock.patch.object(dip, "serve", side_effect=AssertionError("serve() called")), \
                    contextlib.redirect_stderr(io.StringIO()) as stderr, self.assertRaises(SystemExit) as caught:
                dip.main(["--config", config, *argv])
            self.assertEqual(caught.exception.code, 2)
            self.assertEqual(stderr.getvalue().splitlines()[-1], f"docker-image-policy: error: {message}")
        for mode in (["--check", "nginx"], ["--scan"]):   # an unusable credentials file is a configuration error
            result = run_module("--config", config, *mode, "--registry-auth", "/nonexistent/auth.json")
            self.assertEqual((result.returncode, result.stdout), (2, ""), result.stderr)
            self.assertEqual(result.stderr, "docker-image-policy: error: /nonexistent/auth.json: cannot read the"
                                            " registry credentials: No such file or directory\n")
        result = run_module("--config", config, "--addr", "nowhere")   # and as a process
        self.assertEqual(result.returncode, 2)
        self.assertTrue(result.stderr.startswith("usage: docker-image-policy "), result.stderr)
        self.assertTrue(result.stderr.endswith("docker-image-policy: error: --addr: expected HOST:PORT or unix:PATH,"
                                               " not 'nowhere'\n"), result.stderr)

    def test_daemon_signals_ready_reloads_and_stops(self):
        directory = self.fixture.dir
        notify_path = os.path.join(directory, "notify")
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        notify.bind(notify_path)
        notify.settimeout(20)
        self.addCleanup(notify.close)
        sock = os.path.join(directory, "run", "plugins", "d.sock")   # the directory is created
        process = subprocess.Popen([sys.executable, str(MODULE), "--config", self.fixture.config_path,
                                    "--socket", sock, "--addr", "127.0.0.1:0"], stderr=subprocess.PIPE, text=True,
                                   env=dict(os.environ, NOTIFY_SOCKET=notify_path))
        self.addCleanup(process.stderr.close)
        self.addCleanup(process.kill)
        self.assertEqual(notify.recv(100), b"READY=1")
        self.assertTrue(stat.S_ISSOCK(os.stat(sock).st_mode))
        self.fixture.write_config({"whitelist": ["^redis:"]})
        process.send_signal(signal.SIGHUP)
        self.assertEqual((notify.recv(100), notify.recv(100)), (b"RELOADING=1", b"READY=1"))
        process.send_signal(signal.SIGTERM)
        self.assertEqual(process.wait(20), 0)
        self.assertFalse(os.path.exists(sock))
        log = process.stderr.read()
        self.assertIn("reloaded", log)
        self.assertIn("stopped on SIGTERM", log)

    def start_daemon(self, notify_socket: str | None) -> tuple[subprocess.Popen, str, Path]:
        """The daemon on the fixture's policy file: the process, its plugin socket and its stderr."""
        sock, stderr_path = os.path.join(self.fixture.dir, "d.sock"), Path(self.fixture.dir, "stderr")
        environment = {key: value for key, value in os.environ.items() if key != "NOTIFY_SOCKET"}
        if notify_socket is not None:
            environment["NOTIFY_SOCKET"] = notify_socket
        with open(stderr_path, "w") as stderr:
            process = subprocess.Popen([sys.executable, str(MODULE), "--config", self.fixture.config_path,
                                        "--socket", sock, "--addr", "127.0.0.1:0"], stderr=stderr, env=environment)
        self.addCleanup(stop_processes, [process])
        return process, sock, stderr_path

    def ask_daemon(self, sock_path: str, image: str) -> dict[str, Any]:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(10)
            sock.connect(sock_path)
            request = json.dumps(pull(f"/v1.41/images/create?fromImage={image}&tag=7")).encode()
            return json.loads(exchange(sock, post("/AuthZPlugin.AuthZReq", request))[2])

    def test_reload_of_a_deeply_nested_file_keeps_the_running_policy(self):
        notify_path = os.path.join(self.fixture.dir, "notify")
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        notify.bind(notify_path)
        notify.settimeout(20)
        self.addCleanup(notify.close)
        process, sock, stderr = self.start_daemon(notify_path)
        self.assertEqual(notify.recv(100), b"READY=1")
        Path(self.fixture.config_path).write_text("[" * 100000)   # deeper than Python's parser recurses
        process.send_signal(signal.SIGHUP)
        self.assertEqual((notify.recv(100), notify.recv(100)), (b"RELOADING=1", b"READY=1"))
        self.assertIsNone(process.poll())
        self.assertTrue(self.ask_daemon(sock, "nginx")["Allow"])   # the policy that was running
        self.assertEqual(self.ask_daemon(sock, "ubuntu")["Msg"], 'pull of ubuntu:7 denied: blacklist rule "^ubuntu:"'
                                                                  ' matches')
        process.send_signal(signal.SIGTERM)
        self.assertEqual(process.wait(20), 0)
        log = stderr.read_text()
        self.assertIn(f"docker-image-policy: error: reload failed, the running policy stays in force:"
                      f" {self.fixture.config_path}: invalid JSON: maximum recursion depth exceeded while decoding"
                      f" a JSON array from a unicode string\n", log)
        self.assertEqual([line for line in log.splitlines() if ": error: " in line or "Traceback" in line], [
            line for line in log.splitlines() if "reload failed" in line])

    def test_unreachable_notify_socket_is_a_warning(self):
        for notify_socket, error in [
            (os.path.join(self.fixture.dir, "missing", "notify"), "[Errno 2] No such file or directory"),
            (f"@docker-image-policy-test-{os.getpid()}-nobody", "[Errno 111] Connection refused"),   # abstract
        ]:
            with self.subTest(notify_socket):
                self.fixture.write_config(ORIGINAL_CONFIG)
                process, sock, stderr = self.start_daemon(notify_socket)
                wait_for(lambda: "serving" in stderr.read_text(), "the daemon to serve")
                self.assertFalse(self.ask_daemon(sock, "redis")["Allow"])
                self.fixture.write_config({"whitelist": ["^redis:"]})
                process.send_signal(signal.SIGHUP)
                wait_for(lambda: "reloaded" in stderr.read_text(), "the reload")
                self.assertTrue(self.ask_daemon(sock, "redis")["Allow"])
                process.send_signal(signal.SIGTERM)
                self.assertEqual(process.wait(20), 0)
                warning = (f"docker-image-policy: warning: cannot notify systemd at NOTIFY_SOCKET={notify_socket!r}:"
                           f" {error}")
                log = stderr.read_text().splitlines()
                # READY=1, RELOADING=1, READY=1 and STOPPING=1, each a warning and nothing worse.
                self.assertEqual([line for line in log if ": warning: " in line or ": error: " in line], [warning] * 4)

    def test_service_unit(self):
        unit = (HERE / "docker-image-policy.service").read_text()
        for line in ["ExecStart=/usr/bin/python3 /usr/local/bin/docker_image_policy.py"
                     " --config /etc/docker/docker-image-policy.json $DOCKER_IMAGE_POLICY_OPTS",
                     "EnvironmentFile=-/etc/default/docker-image-policy", "Before=docker.service", "Type=notify",
                     "ExecReload=/bin/kill -HUP $MAINPID", "Restart=always", "RestartPreventExitStatus=2",
                     "SyslogIdentifier=docker-image-policy", "CapabilityBoundingSet=", "NoNewPrivileges=yes",
                     "ProtectSystem=strict", "ReadWritePaths=/run/docker/plugins", "ProtectHome=yes",
                     "PrivateTmp=yes", "PrivateDevices=yes", "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6",
                     "RuntimeDirectory=docker-image-policy", "RuntimeDirectoryMode=0700"]:
            self.assertIn(line + "\n", unit)
        self.assertRegex(unit, r"\nDocumentation=\S+")
        if not shutil.which("systemd-analyze"):
            self.skipTest("systemd-analyze is not installed")
        result = subprocess.run(["systemd-analyze", "verify", str(HERE / "docker-image-policy.service")],
                                capture_output=True, text=True)
        problems = [line for line in result.stderr.splitlines() if "docker-image-policy.service" in line
                    and "docker_image_policy.py" not in line and "/usr/local/share/doc" not in line]
        self.assertEqual(problems, [])

    def test_reload_of_the_unit_fails_on_an_invalid_file(self):
        # Run the unit's ExecReload= lines as systemd does: in order, stopping at the first failure.
        unit = (HERE / "docker-image-policy.service").read_text()
        commands = [line.split("=", 1)[1].split() for line in unit.splitlines() if line.startswith("ExecReload=")]
        process, sock, stderr_path = self.start_daemon(None)
        wait_for(lambda: os.path.exists(sock), "the daemon")

        def reload() -> tuple[int, int]:
            """The status systemctl reload gives, and how many of the lines ran."""
            for ran, command in enumerate(commands, 1):
                command = [{"/usr/bin/python3": sys.executable, "/usr/local/bin/docker_image_policy.py": str(MODULE),
                            "/etc/docker/docker-image-policy.json": self.fixture.config_path,
                            "$MAINPID": str(process.pid)}.get(word, word) for word in command]
                status = subprocess.run(command, capture_output=True, timeout=60).returncode
                if status:
                    return status, ran
            return 0, len(commands)

        self.fixture.write_config({"whitelist": ["^redis:("]})
        self.assertEqual(reload(), (2, 1))   # systemctl reload fails at --validate: kill -HUP never runs
        self.fixture.write_config({"whitelist": ["^redis:"]})
        self.assertEqual(reload(), (0, 2))
        wait_for(lambda: "reloaded" in stderr_path.read_text(), "the reload")
        # The daemon read the file once, and the valid one: the invalid file never reached it.
        self.assertEqual(stderr_path.read_text().count("reloaded"), 1)
        self.assertNotIn("reload failed", stderr_path.read_text())

    def test_original_plugin_flags(self):
        # The Go plugin's single-dash flags keep their meaning, or say what replaced them.
        self.assertEqual(run_module("-version").stdout, f"Version: {dip.__version__}\n")
        self.assertEqual(dip.translate_original_flags(
            ["-config", "/etc/p.json", "-addr=127.0.0.1:5006", "-host", "unix:///x.sock", "-debug", "-debug=false",
             "--config", "/y", "-h"]),
            ["--config", "/etc/p.json", "--addr=127.0.0.1:5006", "--docker-host", "unix:///x.sock",
             "--log-level=debug", "--config", "/y", "-h"])
        result = run_module("-config", self.fixture.config_path, "-host", "unix:///nowhere.sock", "--validate")
        self.assertEqual(result.returncode, 0, result.stderr)
        for flag in ("-cert-path=/etc/docker/certs", "-tls-verify"):
            with self.subTest(flag):
                result = run_module(flag)
                self.assertEqual(result.returncode, 2)
                self.assertIn(f"error: {flag.split('=')[0]} is the original plugin's TLS option for a remote Docker"
                              " host, which this plugin does not support: use --docker-host", result.stderr)

    def test_which_decisions_are_logged(self):
        allowed, denied = pull("/v1.41/images/create?fromImage=nginx&tag=1"), pull(
            "/v1.41/images/create?fromImage=redis&tag=7")
        for setting, expected in [("all", ["allow", "deny"]), ("denies", ["deny"]), ("none", [])]:
            with self.subTest(setting):
                self.fixture.log.truncate(0)
                self.fixture.log.seek(0)
                self.fixture.plugin.log.decisions = setting
                self.fixture.plugin.log.level = dip.LOG_LEVELS["error"]   # a separate setting
                self.ask(allowed)
                self.ask(denied)
                lines = [json.loads(line)["decision"] for line in self.fixture.log.getvalue().splitlines()]
                self.assertEqual(lines, expected)
        self.assertEqual(run_module("--log-decisions", "some").returncode, 2)

    def test_priorities_for_journald(self):
        with tempfile.TemporaryFile("w+") as stream:
            status = os.fstat(stream.fileno())
            with mock.patch.dict(os.environ, JOURNAL_STREAM=f"{status.st_dev}:{status.st_ino}"), \
                    mock.patch("os.fstat", return_value=status):
                log = dip.Log("info", stream)
            log.event("error", "reload failed")
            log.event("warning", "slow")
            log.decision(dip.Decision(False, dip.PULL, "docker.io/library/redis:7", "redis:7"), "deny", ENFORCE)
            stream.seek(0)
            lines = stream.read().splitlines()
        self.assertEqual([line[:3] for line in lines], ["<3>", "<4>", "<5>"])
        self.assertEqual(lines[0], "<3>docker-image-policy: error: reload failed")
        plain = io.StringIO()
        with mock.patch.dict(os.environ, JOURNAL_STREAM="1:2"):   # stderr is something else
            dip.Log("info", plain).event("error", "reload failed")
        self.assertEqual(plain.getvalue(), "docker-image-policy: error: reload failed\n")

    def test_old_python_is_told_what_it_needs(self):
        program = ("import sys, runpy; sys.version_info = (3, 9, 2); sys.version = '3.9.2 (test)';"
                   f" runpy.run_path({str(MODULE)!r}, run_name='__main__')")
        result = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=60)
        self.assertEqual((result.returncode, result.stderr),
                         (1, "docker-image-policy needs Python 3.11 or newer, not 3.9.2 (Debian 12 and Ubuntu"
                             " 24.04 have it)\n"))

    def test_socket_without_root_says_root_is_needed(self):
        if os.geteuid() != 0 or not os.access("/usr/bin/python3", os.X_OK):
            self.skipTest("needs root and /usr/bin/python3 to run the daemon as another user")
        os.chmod(self.fixture.dir, 0o755)
        module = shutil.copy(MODULE, self.fixture.dir)
        os.chmod(module, 0o644)
        os.chmod(self.fixture.config_path, 0o644)
        directory = os.path.join(self.fixture.dir, "plugins")   # root's, like /run/docker/plugins
        os.mkdir(directory, 0o755)
        result = subprocess.run(["/usr/bin/python3", module, "--config", self.fixture.config_path, "--socket",
                                 os.path.join(directory, "p.sock"), "--addr", "127.0.0.1:0"], capture_output=True,
                                text=True, timeout=60, user=65534, group=65534, cwd="/")
        self.assertEqual(result.returncode, 1, result.stderr)
        self.assertIn("Permission denied (the plugin socket needs root)", result.stderr)
        self.assertFalse(os.listdir(directory))

    def test_module_type_checks(self):
        mypy = "/usr/bin/mypy" if os.path.exists("/usr/bin/mypy") else shutil.which("mypy")   # Debian's, if there
        if mypy is None:
            if REQUIRE_E2E:
                self.fail("mypy is not installed (Debian: apt-get install mypy)")
            self.skipTest("mypy is not installed")
        with tempfile.TemporaryDirectory(prefix="dip") as cache:
            result = subprocess.run([mypy, "--cache-dir", cache, MODULE.name], cwd=HERE, capture_output=True,
                                    text=True, timeout=300)
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        self.assertTrue(result.stdout.startswith("Success"), result.stdout)

    def test_a_missing_private_parser_is_said_at_start(self):
        self.assertEqual(dip.startup_warnings(), [])
        with mock.patch.object(dip, "regex_parser", None):
            self.assertEqual(len(dip.startup_warnings()), 1)
            self.assertIn("no re._parser: rules are not indexed", dip.startup_warnings()[0])
            policy = policy_of({"whitelist": ["^nginx:"]})   # rules still decide, unindexed
            self.assertTrue(policy.evaluate(parse_reference("nginx:1")).allow)
            self.assertFalse(policy.evaluate(parse_reference("redis:1")).allow)

    def test_module_compiles_without_warnings(self):
        # An invalid escape in a docstring is a SyntaxWarning on Python 3.12 and later, printed to the
        # journal at every start: -W error makes it fail here, on every interpreter the machine has.
        pythons = {sys.executable, *(path for path in (shutil.which(f"python3.{minor}") for minor in range(11, 15))
                                     if path and "/shims/" not in path)}
        pythons |= {str(path) for path in Path(os.path.expanduser("~/.pyenv/versions")).glob("3.1[1-9]*/bin/python3")}
        for python in sorted(pythons):
            with self.subTest(python):
                result = subprocess.run([python, "-W", "error", "-c", "import pathlib, sys; compile(pathlib.Path("
                                         "sys.argv[1]).read_text(), sys.argv[1], 'exec')", str(MODULE)],
                                        capture_output=True, text=True)
                self.assertEqual((result.returncode, result.stderr), (0, ""))

    def test_sections_read_in_data_flow_order(self):
        # The daemon's path reads top to bottom and the offline tools come after it: no top-level
        # name is used in a section before the one that defines it. Annotations name types only;
        # the lambdas of the operation table, at the head, are the one place the module reaches forward.
        lines = MODULE.read_text().splitlines()
        banners = [index + 1 for index in range(len(lines) - 2)
                   if lines[index].startswith("# ---") and lines[index + 2].startswith("# ---")]
        self.assertEqual([lines[line] for line in banners][-7:], [
            "# The plugin: policy reference, reloads, AuthZ answers", "# HTTP handlers", "# Servers",
            "# Judging without dockerd: a docker command's request, and the policy's own tests",
            "# Offline tools: --check, --scan, --replay", "# The linter: --validate's warnings", "# Command line"])
        tree = ast.parse("\n".join(lines))

        def section(node: ast.AST) -> int:
            return bisect.bisect(banners, node.lineno)

        defined: dict[str, int] = {}
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                defined.setdefault(node.name, section(node))
            for target in getattr(node, "targets", [getattr(node, "target", None)]):
                for name in ast.walk(target) if target else ():
                    if isinstance(name, ast.Name):
                        defined.setdefault(name.id, section(node))
        skipped = set()
        for node in ast.walk(tree):
            for annotation in filter(None, (getattr(node, "annotation", None), getattr(node, "returns", None))):
                skipped.update(id(part) for part in ast.walk(annotation))
        head = [node for node in tree.body if section(node) == 0]
        lambdas = [part for node in head for part in ast.walk(node) if isinstance(part, ast.Lambda)]
        self.assertGreater(len(lambdas), 10)   # the operation table's
        skipped.update(id(part) for lam in lambdas for part in ast.walk(lam.body))
        forward = [f"{name.id} at line {name.lineno}" for node in tree.body for name in ast.walk(node)
                   if isinstance(name, ast.Name) and id(name) not in skipped
                   and defined.get(name.id, 0) > section(node)]
        self.assertEqual(forward, [])

    def test_example_config_is_valid(self):
        path = str(HERE / "docker-image-policy.json")
        result = run_module("--config", path, "--validate", "--strict")
        self.assertEqual((result.returncode, result.stderr), (0, ""))
        self.assertEqual(result.stdout, f"{path}: all 10 tests pass\n"   # the tests the file carries
                                        f"{path}: valid, 0 whitelist and 0 blacklist rules, 6 scope entries,"
                                        " mode enforce\n")
        # Approved nginx, docker and calico images, by tag or digest; never :latest, nor a look-alike.
        policy = dip.load_policy(path)
        for image, allow in [("nginx:1.25", True), (f"nginx@{DIGEST}", True), ("docker:24-dind", True),
                             ("quay.io/calico/node:v3.27.0", True), (f"quay.io/calico/node@{DIGEST}", True),
                             ("nginx", False), ("nginx:latest", False), ("docker:latest", False),
                             ("quay.io/calico/node", False), ("redis:7", False), ("nginx:5000/evil/miner:1", False),
                             ("nginxevil/miner:1", False), ("quay.io/calico/node-evil:v3", False),
                             ("registry-1.docker.io/library/nginx:1.25", False), ("nginx-evil:1", False)]:
            with self.subTest(image):
                self.assertEqual(policy.evaluate(parse_reference(image)).allow, allow)


# --------------------------------------------------------------------------
# Reliability: bad input, load with reloads
# --------------------------------------------------------------------------

IMAGE_TARGETS = [
    "/v1.41/images/create?fromImage={image}&tag={tag}", "/images/create?fromImage={image}",
    "/v1.41/images%2Fcreate?fromImage={image}&tag={tag}", "http://d/v1.24/images/create?tag={tag}&fromImage={image}",
    "/v1.41/containers/create?name={tag}", "/v1.41/services/create", "/v1.41/services/{name}/update",
    "/v1.41/plugins/pull?remote={image}", "/v1.41/images/{image}/tag?repo={image}&tag={tag}",
    "/v1.41/images/load", "/v1.41/build?t={image}", "/session", "/v1.41/commit?container=c&repo={image}",
    "/v1.41/images/create?fromSrc=-&repo={image}", "/v1.41/plugins/create?name={tag}",
]
BENIGN_TARGETS = ["/v1.41/containers/json?all=1", "/_ping", "/v1.41/containers/{name}/start", "/v1.41/info"]


def fuzz_request(rng: random.Random) -> tuple[bytes, bool]:
    """A mutated AuthZReq body, and whether an allow would be a policy breach."""
    image = rng.choice(["redis", "redis:7", "Redis", "evil%2Fimg", "a" * 300, "", "%zz", "docker.io/x/y@sha256:1",
                        "localhost:5000/nope/app", "sha256:" + "c" * 64, "abc", "\u212a", "x&fromImage=y"])
    tag = rng.choice(["1", "", "latest", "bad:tag", "%00", "\u017f", "1#", "1;2", DIGEST])
    image_route = rng.random() < 0.7
    template = rng.choice(IMAGE_TARGETS if image_route else BENIGN_TARGETS)
    if template.startswith("/v1.41/images/{image}/tag"):
        image = image or "redis"   # images//tag is cleaned to images/tag, no route: dockerd redirects it
    target = template.format(image=image, tag=tag, name=rng.choice(["abc", "x%2Fy", "\u017f", "1"]))
    method = "POST" if image_route else rng.choice(["GET", "POST", "HEAD", "DELETE"])
    body: Any = rng.choice([
        None, {"Image": image}, {"image": [image]}, {"Image": None}, {"TaskTemplate": {"ContainerSpec": 7}},
        {"TaskTemplate": {"ContainerSpec": {"Image": image + ":" + tag}}}, [image], "x" * rng.randint(0, 3000),
        {"a": [[[[[[]]]]]] * 100}, {"Image": {"nested": image}},
    ])
    request: dict[str, Any] = {"RequestMethod": method, "RequestUri": target, "RequestHeaders": rng.choice([
        {}, {"Content-Type": "application/json"}, {"Content-Type": "application/x-www-form-urlencoded"},
        {"content-type": "text/plain", "Content-Length": "0"}, {"Content-Length": "12"}, "headers", [1]])}
    if body is not None:
        request["RequestBody"] = base64.b64encode(json.dumps(body).encode()).decode()
    mutation = rng.randrange(12)
    if mutation == 0:
        request["RequestBody"] = rng.choice(["!!!", 5, None, [1], "YWJj="])
    elif mutation == 1:
        request[rng.choice(["RequestMethod", "RequestUri"])] = rng.choice([None, 5, [], {}, "", "\x00"])
    elif mutation == 2:
        del request[rng.choice(["RequestMethod", "RequestUri"])]
    elif mutation == 3:
        request["RequestUri"] = "".join(chr(rng.randrange(1, 0x3000)) for _ in range(rng.randint(0, 40)))
    elif mutation == 4:
        request["RequestBody"] = base64.b64encode(bytes(rng.randrange(256) for _ in range(100))).decode()
    raw = json.dumps(request).encode()
    if mutation in (5, 6):   # corrupt the JSON text itself
        raw = bytearray(raw)
        for _ in range(rng.randint(1, 5)):
            raw[rng.randrange(len(raw))] = rng.randrange(256)
        raw = bytes(raw)
    elif mutation == 7:
        raw = raw[: rng.randrange(len(raw))]
    elif mutation == 8:
        raw = bytes(rng.randrange(256) for _ in range(rng.randint(0, 200)))
    try:
        parsed = json.loads(raw)
    except (ValueError, RecursionError):
        return raw, True   # unparseable: must be denied
    if not isinstance(parsed, dict):
        return raw, True
    method = parsed.get("RequestMethod")
    benign_method = isinstance(method, str) and method.upper() != "POST"   # no image route takes another method
    return raw, image_route and parsed.get("RequestUri") == target and not benign_method


# Image names for the fuzz's rule-driven phase: registries, paths, tags and
# digests that combine into references dockerd accepts, and now and then a
# part it refuses.
NAME_HOSTS = ["", "", "", "docker.io/", "docker.io/library/", "index.docker.io/", "registry-1.docker.io/",
              "registry.hub.docker.com/", "docker.io:443/", "DOCKER.IO/", "quay.io/", "quay.io:443/", "QUAY.IO:443/",
              "localhost:5000/", "LOCALHOST:5000/", "ghcr.io/", "[::1]:5000/", "Evil/"]
NAME_PATHS = (["nginx", "nginx", "redis", "team/app", "calico/node", "evil/miner", "library/nginx", "a.b_c/x__y-1",
               "abcd", "moby-dangling", "x-1/y.z"], ["Nginx", "a..b", "-x", "ngin x", "a" * 256])
NAME_TAGS = (["1", "1.25", "1.25", "latest", "v3", "6.2", "Prod_1"], ["-bad", "bad:tag", "t" * 129])
NAME_DIGESTS = ([DIGEST], ["sha256:abc", "md5:" + "a" * 32, "sha256:" + "A" * 64])
# The rule-driven phase's policy: each rule matches some of those names.
NAME_POLICY = {"whitelist": ["^nginx:1\\.", "^quay\\.io/calico/", "^localhost:5000/team/", "^docker\\.io/team/",
                             "@sha256:[0-9a-f]{64}$"],
               "blacklist": ["^evil/", ":latest$", "^redis:6", "^docker\\.io/library/abcd"]}


def expected_verdict(config: dict[str, Any], reference: dip.Reference) -> tuple[bool, str, str]:
    """What the original plugin's loop says of a reference: (allow, rule, reason), rule by rule in file order.

    Independent of Policy.evaluate: each rule is Python's re over the forms,
    the canonical ones too for a rule that names docker.io or a blacklist rule
    that does not match every Docker Hub name, and a blacklist sees the
    repository's usual name as well.
    """
    if reference.repository == "docker.io/library/moby-dangling":
        return False, "nameless", ("moby-dangling is the containerd image store's placeholder for an image that lost"
                                   " its last name, and a nameless image has no name the policy could allow")
    spellings = [("", reference)] + ([(f" {reference.alias.familiar}, the same repository under its usual name",
                                       reference.alias)] if reference.alias else [])
    for kind in ("whitelist", "blacklist"):
        for also, spelling in spellings[:1] if kind == "whitelist" else spellings:
            for index, pattern in enumerate(config.get(kind, [])):
                hub = ("docker.io/library/zz0:1", "docker.io/zz0/zz0:1")
                canonical = "docker\\.io" in pattern or kind == "blacklist" and not all(
                    re.search(pattern, name) for name in hub)
                forms = spelling.forms(False) + (spelling.forms(True) if canonical else ())
                if any(re.search(pattern, form) for form in forms):
                    return (kind == "whitelist", f"{kind}[{index}] {json.dumps(pattern)}",
                            f"{kind} rule {json.dumps(pattern)} matches{also}")
    if config.get("defaultAllow"):
        return True, "defaultAllow", "no rule matches and defaultAllow is true"
    return False, "defaultAllow", "no whitelist rule matches and defaultAllow is false"


def name_part(rng: random.Random, parts: tuple[list[str], list[str]]) -> str:
    accepted, refused = parts
    return rng.choice(refused if rng.random() < 0.08 else accepted)


def fuzz_image_name(rng: random.Random) -> tuple[str, str]:
    """A repository (registry and path) and what follows it: ":tag" or "@digest"."""
    repository = rng.choice(NAME_HOSTS) + name_part(rng, NAME_PATHS)
    if rng.random() < 0.25:
        return repository, "@" + name_part(rng, NAME_DIGESTS)
    return repository, ":" + name_part(rng, NAME_TAGS)


def named_request(rng: random.Random) -> tuple[str, str, dict[str, Any]]:
    """A well-formed AuthZReq naming one image: its operation, the image's name and the request."""
    repository, suffix = fuzz_image_name(rng)
    name = repository + suffix
    encode = rng.choice([lambda text: quote(text, safe=""), lambda text: quote(text, safe="/:[]@")])
    operation = rng.choice(["pull", "pull", "run", "run", "service", "plugin install"])
    if operation == "pull":   # as the CLI 20.10 (familiar name, text/plain) and 28 (any name, no Content-Type) send it
        uri = f"/v1.41/images/create?fromImage={encode(repository)}&tag={encode(suffix[1:])}"
        headers = rng.choice([{"Content-Type": "text/plain", "Content-Length": "0"}, {"Content-Length": "0"}])
        return operation, name, authz("POST", uri, headers=headers)
    if operation == "plugin install":
        return operation, name, authz("POST", f"/v1.41/plugins/pull?remote={encode(name)}&name=p", [])
    key = rng.choice(["Image", "image", "IMAGE"])   # Go matches keys case-insensitively
    if operation == "run":
        return operation, name, authz("POST", "/v1.41/containers/create?name=c", {key: name})
    return operation, name, authz("POST", "/v1.41/services/create", {"TaskTemplate": {"ContainerSpec": {key: name}}})


def raw_garbage(rng: random.Random) -> bytes:
    return rng.choice([
        bytes(rng.randrange(256) for _ in range(rng.randint(1, 300))),
        b"POST /AuthZPlugin.AuthZReq HTTP/1.1\r\nContent-Length: 50\r\n\r\n{\"Req",   # truncated body
        b"POST /AuthZPlugin.AuthZReq HTTP/1.1\r\nContent-Le",                          # truncated headers
        b"BREW /AuthZPlugin.AuthZReq HTTP/1.1\r\n\r\n", b"POST * HTTP/9.9\r\n\r\n", b"\r\n\r\n",
        b"POST /AuthZPlugin.AuthZReq HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
        b"POST /AuthZPlugin.AuthZReq HTTP/1.1\r\nContent-Length: 99999999999999999999\r\n\r\n",
    ])


class TestFleet(unittest.TestCase):
    """The README's fleet loop, as written there, checked with the tools operators run."""

    def setUp(self):
        self.dir = Path(tempfile.mkdtemp(prefix="dip-fleet-"))
        self.addCleanup(shutil.rmtree, self.dir)

    def run_tool(self, *command: str) -> subprocess.CompletedProcess:
        return subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=self.dir)

    def test_playbook_passes_ansible_syntax_check(self):
        ansible = tool("ansible-playbook", "ansible-core")
        playbook = readme_block("**The playbook**")
        for name, text, status in [("docker-image-policy.yml", playbook, 0),
                                   ("misspelled.yml", playbook.replace("builtin.template", "builtin.templates"), 4)]:
            with self.subTest(name):
                (self.dir / name).write_text(text)
                result = self.run_tool(ansible, "--syntax-check", "-i", "localhost,", name)
                self.assertEqual(result.returncode, status, result.stdout + result.stderr)
                if status:
                    self.assertIn("couldn't resolve module/action 'ansible.builtin.templates'", result.stderr)
                else:
                    self.assertEqual(result.stdout.strip(), f"playbook: {name}")

    def test_playbook_validates_each_policy_before_it_is_put_in_place(self):
        validate = re.search(r"^ +validate: (.*)$", readme_block("**The playbook**"), re.M)[1]
        self.assertIn("--validate --strict --config %s", validate)
        template = (HERE / "docker-image-policy.json").read_text().replace('"mode": "enforce"', '"mode": "audit"')
        for name, text, status in [("audit.json", template, 0), ("broken.json", template[:-20], 2),
                                   ("warned.json", json.dumps({"whitelist": ["^nginx"]}), 1)]:
            with self.subTest(name):
                (self.dir / name).write_text(text)
                command = validate.replace("/usr/local/bin/docker_image_policy.py", str(MODULE)).replace(
                    "%s", str(self.dir / name)).split()
                result = self.run_tool(sys.executable, *command[1:])
                self.assertEqual(result.returncode, status, result.stdout + result.stderr)

    def alert_files(self, rules: str | None = None) -> None:
        (self.dir / "docker-image-policy.rules.yml").write_text(rules or readme_block("**The alert rules**"))
        (self.dir / "docker-image-policy.rules.test.yml").write_text(readme_block("**Their tests**"))

    def test_alert_rules_pass_promtool(self):
        promtool = tool("promtool", "prometheus")
        self.alert_files()
        result = self.run_tool(promtool, "check", "rules", "docker-image-policy.rules.yml")
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        self.assertIn("SUCCESS: 7 rules found", result.stdout)
        result = self.run_tool(promtool, "test", "rules", "docker-image-policy.rules.test.yml")
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        self.assertIn("SUCCESS", result.stdout)
        # The tests fail when an alert does not fire as they expect.
        self.alert_files(readme_block("**The alert rules**").replace("== 0\n        for: 2m", "== 0\n        for: 5m"))
        result = self.run_tool(promtool, "test", "rules", "docker-image-policy.rules.test.yml")
        self.assertEqual(result.returncode, 1, result.stdout)
        self.assertIn("alertname: DockerImagePolicyDown, time: 3m", result.stdout + result.stderr)

    def test_alert_rules_use_the_metrics_the_plugin_serves(self):
        # With an exception, so that the plugin serves when the next one ends.
        fixture = PluginFixture(dict(ORIGINAL_CONFIG, scopes=[{"allow": "ghcr.io/vendor", "until": "2099-01-31"}]))
        self.addCleanup(fixture.close)
        served = set(re.findall(r"^# TYPE (\S+)", fixture.get("/metrics")[1], re.M))
        rules = readme_block("**The alert rules**")
        used = {re.sub(r"_bucket$", "", name) for name in re.findall(r"\bdocker_image_policy_\w+", rules)}
        self.assertEqual(len(used), 6, used)
        self.assertLessEqual(used, served)


class TestReliability(unittest.TestCase):
    scale = 10 if LONG else 1

    def test_fuzzed_requests_never_crash_hang_or_allow(self):
        fixture = PluginFixture({"whitelist": ["^localhost:5000/ok/"], "defaultAllow": False})
        self.addCleanup(fixture.close)
        rng = random.Random(7)
        counts = {"allowed": 0, "denied": 0, "errors": 0, "garbage": 0, "dropped": 0}
        sock = fixture.connect()
        self.addCleanup(lambda: sock.close())
        for number in range(20_000 * self.scale):
            if number % 50 == 49:   # raw garbage on its own connection, then close it
                with fixture.connect() as bad:
                    bad.settimeout(5)
                    bad.sendall(raw_garbage(rng))
                    bad.shutdown(socket.SHUT_WR)
                    while bad.recv(65536):
                        pass   # the plugin answers or closes; it never hangs
                counts["garbage"] += 1
                continue
            raw, breach_if_allowed = fuzz_request(rng)
            method = rng.choice(["POST"] * 20 + ["GET", "PUT"])
            try:
                status, headers, body = exchange(sock, (post("/AuthZPlugin.AuthZReq", raw)).replace(b"POST", method.encode(), 1))
            except (ConnectionError, http.client.HTTPException):
                counts["dropped"] += 1
                sock.close()
                sock = fixture.connect()
                continue
            answer = json.loads(body)   # always well-formed JSON
            self.assertEqual(status, 200 if method == "POST" else 405)
            if status != 200:
                self.assertEqual(answer, {"Err": "plugin endpoints accept POST only"})
                counts["errors"] += 1
                if headers.get("connection") == "close":
                    sock.close()
                    sock = fixture.connect()
                continue
            if answer["Allow"]:
                counts["allowed"] += 1
                self.assertFalse(breach_if_allowed, raw[:300])
            else:
                counts["denied"] += 1
                self.assertTrue(answer["Msg"])
                self.assertNotIn("internal error", answer["Msg"], raw[:300])
        sock.close()
        # The plugin closes a connection only after an answer that says so: a
        # connection that drops under a client is a request left unanswered.
        self.assertEqual(counts["dropped"], 0)
        self.assertGreater(counts["denied"], 5000 * self.scale)
        self.assertGreater(counts["allowed"], 500 * self.scale)
        with fixture.connect() as sock:   # still answers correctly
            for image, allow in [("localhost:5000/ok/app", True), ("redis", False)]:
                request = json.dumps(pull(f"/v1.41/images/create?fromImage={image}&tag=1")).encode()
                self.assertIs(json.loads(exchange(sock, post("/AuthZPlugin.AuthZReq", request))[2])["Allow"], allow)

        # Rule-driven phase: well-formed requests naming generated images under a
        # policy that allows some of them; the policy's verdict on the named
        # reference is what the plugin must answer, however the request spells it.
        fixture.write_config(NAME_POLICY)
        self.assertTrue(fixture.plugin.reload())
        fixture.plugin.docker = AnyNameIsNoImage()   # "abcd" may be a short ID: dockerd knows no such image
        verdicts: dict[str, int] = {}
        config: dict[str, Any] = NAME_POLICY
        with fixture.connect() as sock:
            for number in range(6_000 * self.scale):
                if number == 3_000 * self.scale:
                    config = dict(NAME_POLICY, defaultAllow=True)
                    fixture.write_config(config)
                    self.assertTrue(fixture.plugin.reload())
                operation, name, request = named_request(rng)
                status, _, body = exchange(sock, post("/AuthZPlugin.AuthZReq", json.dumps(request).encode()))
                answer = json.loads(body)
                self.assertEqual(status, 200)
                self.assertNotIn("internal error", answer["Msg"], name)
                try:
                    reference = parse_reference(name)
                except InvalidReference:
                    verdicts["invalid"] = verdicts.get("invalid", 0) + 1
                    self.assertIs(answer["Allow"], False, name)
                    self.assertRegex(answer["Msg"], r" denied: invalid (reference|tag) ", name)
                    continue
                allow, rule, reason = expected_verdict(config, reference)
                kind = rule.split("[")[0] + (" allows" if allow else " denies")
                verdicts[kind] = verdicts.get(kind, 0) + 1
                expected = "" if allow else f"{operation} of {reference.familiar} denied: {reason}"
                self.assertEqual((answer["Allow"], answer["Msg"]), (allow, expected), request)
        # Every kind of rule decided a good share, and few names were unreadable.
        for kind in ["whitelist allows", "blacklist denies", "defaultAllow allows", "defaultAllow denies"]:
            self.assertGreater(verdicts.get(kind, 0), 500 * self.scale, verdicts)
        self.assertLess(verdicts["invalid"], sum(verdicts.values()) / 4, verdicts)
        log = fixture.log.getvalue()
        self.assertNotIn("internal error", log)
        self.assertNotIn(": error:", log)

    def test_soak_with_reloads(self):
        directory = tempfile.mkdtemp(prefix="dip")
        self.addCleanup(shutil.rmtree, directory)
        config = Path(directory, "policy.json")
        policies = [{"whitelist": ["^nginx:"], "message": "policy A"}, {"whitelist": ["^redis:"], "message": "policy B"}]
        config.write_text(json.dumps(policies[0]))
        sock_path = os.path.join(directory, "p.sock")
        log = Path(directory, "stderr")
        with open(log, "w") as stderr:
            process = subprocess.Popen([sys.executable, str(MODULE), "--config", str(config), "--socket", sock_path,
                                        "--addr", "127.0.0.1:0"], stderr=stderr)
        self.addCleanup(process.wait)
        self.addCleanup(process.terminate)
        wait_for(lambda: os.path.exists(sock_path), "the plugin socket")
        denied = "{} denied: no whitelist rule matches and defaultAllow is false. policy {}"
        allowed = (True, "")
        # Each request, and its answer under policy A and under policy B.
        requests = [
            (pull("/v1.41/images/create?fromImage=nginx&tag=1"), allowed,
             (False, denied.format("pull of nginx:1", "B"))),
            (pull("/v1.41/images/create?fromImage=redis&tag=1"),
             (False, denied.format("pull of redis:1", "A")), allowed),
            (authz("POST", "/v1.41/containers/create", {"Image": "nginx:2"}), allowed,
             (False, denied.format("run of nginx:2", "B"))),
            (authz("POST", "/v1.41/containers/create", {"Image": "redis:2"}),
             (False, denied.format("run of redis:2", "A")), allowed),
            (authz("GET", "/_ping"), allowed, allowed),
        ]
        bodies = [post("/AuthZPlugin.AuthZReq", json.dumps(request).encode()) for request, _, _ in requests]
        errors: list[str] = []
        seen: set[tuple[int, bool, str]] = set()
        answered: list[int] = []
        per_connection = 2500 * self.scale

        def client() -> None:
            count = 0
            try:
                with socket.socket(socket.AF_UNIX) as sock:
                    sock.settimeout(30)
                    sock.connect(sock_path)
                    for number in range(per_connection):
                        index = number % len(bodies)
                        status, _, body = exchange(sock, bodies[index])
                        answer = json.loads(body)
                        if status != 200 or (answer["Allow"], answer["Msg"]) not in requests[index][1:]:
                            errors.append(f"{status} {answer}")
                        seen.add((index, answer["Allow"], answer["Msg"]))
                        count += 1
            except Exception as error:   # a client that fails is reported, with how far it got
                errors.append(f"client failed after {count} answers: {error!r}")
            answered.append(count)

        def rss() -> int:
            return int(re.search(r"VmRSS:\s+(\d+)", Path(f"/proc/{process.pid}/status").read_text())[1])

        stop = threading.Event()
        reloads = 0

        def reloader() -> None:
            nonlocal reloads
            while not stop.is_set():
                config.write_text(json.dumps(policies[reloads % 2]))
                process.send_signal(signal.SIGHUP)
                reloads += 1
                time.sleep(0.01)

        memory = []
        for round_ in range(2):
            threads = [threading.Thread(target=client) for _ in range(4)]
            stop.clear()
            reload_thread = threading.Thread(target=reloader)
            for thread in threads + [reload_thread]:
                thread.start()
            for thread in threads:
                thread.join()
            stop.set()
            reload_thread.join()
            memory.append(rss())
        self.assertEqual(errors, [])
        self.assertEqual(answered, [per_connection] * 8)
        # Both policies answered every image request: the reloads happened under load.
        self.assertEqual(seen, {(index, *answer) for index, (_, *answers) in enumerate(requests) for answer in answers})
        self.assertGreater(reloads, 50)
        self.assertLess(memory[1] - memory[0], 4096, f"RSS grew from {memory[0]} kB to {memory[1]} kB")
        process.terminate()
        self.assertEqual(process.wait(20), 0)
        text = log.read_text()
        self.assertIn("stopped on SIGTERM", text)
        self.assertNotIn("internal error", text)


def stop_processes(processes: list[subprocess.Popen]) -> None:
    """Stop what a test started, last first, and wait for each."""
    for process in reversed(processes):
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def wait_for(condition: Any, what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


# --------------------------------------------------------------------------
# End to end: real registry, real dockerd engines, real docker CLIs
# --------------------------------------------------------------------------

ENGINE_CACHE = Path(os.environ.get("DOCKER_IMAGE_POLICY_ENGINE_CACHE", "/var/cache/docker-image-policy-tests"))
# The machine's CLI (20.10) and sid's (28.x): they name images differently (PROTOCOL.md, section 4).
CLIS = ["/usr/bin/docker", str(ENGINE_CACHE / "sid/docker-cli/usr/bin/docker")]
# A Debian archive's URI, not debian-security's or a ports archive's: the mirror the machine already uses.
DEBIAN_ARCHIVE = r"\S+/debian/?"


class Missing(Exception):
    """Something the end-to-end suite needs is not on this machine."""


def readme_block(marker: str) -> str:
    """The first fenced code block after the README line that starts with marker: the README's copy is the one tested."""
    text = (HERE / "README.md").read_text()
    at = text.index("\n" + marker)
    opening = text.index("```", at)
    body = text.index("\n", opening) + 1
    return textwrap.dedent(text[body:text.index("```", body)])


def tool(name: str, package: str) -> str:
    """A tool the tests run, or a skip (a failure when CI requires every test) naming its Debian package."""
    found = shutil.which(name, path=os.environ.get("PATH", "") + ":/usr/sbin:/lib/systemd")
    if found:
        return found
    if REQUIRE_E2E:
        raise AssertionError(f"{name} is required but not installed (apt-get install {package})")
    raise unittest.SkipTest(f"{name} is not installed (apt-get install {package})")


def journal_exports(lines: list[str], host: str, work: Path) -> dict[str, str]:
    """What journalctl -o json, -o short-iso and -o cat print for lines the plugin wrote on host.

    The lines go into a real journal file, as journald on the host and systemd-journal-remote
    on a central log host store them (the fields journald adds to a service's output), and are
    read back by journalctl itself.
    """
    remote, journalctl = tool("systemd-journal-remote", "systemd-journal-remote"), tool("journalctl", "systemd")
    work.mkdir(exist_ok=True)
    export = b""
    for number, line in enumerate(lines):
        logged = re.search(r'"time": "([^"]+)"', line)
        seconds = calendar.timegm(time.strptime(logged[1], "%Y-%m-%dT%H:%M:%SZ")) if logged else int(time.time())
        fields = {"__REALTIME_TIMESTAMP": str(seconds * 1_000_000 + number), "__MONOTONIC_TIMESTAMP": str(number + 1),
                  "_BOOT_ID": "0" * 32, "_HOSTNAME": host, "_TRANSPORT": "stdout", "_PID": "4242", "_UID": "0",
                  "_SYSTEMD_UNIT": "docker-image-policy.service", "SYSLOG_IDENTIFIER": "docker-image-policy",
                  "PRIORITY": "6" if '"decision": "allow"' in line else "5" if line.startswith("{") else "6",
                  "MESSAGE": line}
        export += b"".join(f"{key}={value}\n".encode() for key, value in fields.items()) + b"\n"
    (work / "export").write_bytes(export)
    journal = work / f"{host}.journal"
    subprocess.run([remote, f"--output={journal}", str(work / "export")], check=True, capture_output=True)
    return {output: subprocess.run([journalctl, f"--file={journal}", "-o", output, "-t", "docker-image-policy"],
                                   check=True, capture_output=True, text=True).stdout
            for output in ("json", "short-iso", "cat")}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def debian_source(suite: str, apt: Path = Path("/etc/apt")) -> tuple[str, str]:
    """An apt source file (name, text) for one suite of the machine's Debian archive.

    The machine's sources may be deb822 stanzas or one-line entries. Only the first
    entry is kept: apt refuses the same archive twice with different options.
    """
    for path in sorted(apt.glob("sources.list.d/*.sources")):
        for stanza in path.read_text().split("\n\n"):
            if re.search(rf"^URIs:\s*{DEBIAN_ARCHIVE}\s*$", stanza, re.M):
                return "debian.sources", re.sub(r"^Suites:.*$", f"Suites: {suite}", stanza.strip(), flags=re.M) + "\n"
    one_line = re.compile(rf"(deb\s+(?:\[[^]]*\]\s+)?{DEBIAN_ARCHIVE}\s+)\S+")
    for path in [apt / "sources.list", *sorted(apt.glob("sources.list.d/*.list"))]:
        for line in path.read_text().splitlines() if path.exists() else []:
            if one_line.match(line):
                return "debian.list", one_line.sub(rf"\g<1>{suite}", line) + "\n"
    raise Missing(f"no Debian archive in the apt sources under {apt}")


def apt_download(suite: str, packages: list[str], work: Path) -> list[Path]:
    """Download packages of a suite into work, with apt lists of its own: the machine's apt is untouched."""
    (work / "sources").mkdir()
    name, text = debian_source(suite)
    (work / "sources" / name).write_text(text)
    (work / "lists/partial").mkdir(parents=True)
    (work / "cache/archives/partial").mkdir(parents=True)
    options = ["-o", "Dir::Etc::SourceList=/dev/null", "-o", f"Dir::Etc::SourceParts={work}/sources",
               "-o", f"Dir::State::Lists={work}/lists", "-o", f"Dir::Cache={work}/cache",
               "-o", "APT::Sandbox::User=root"]
    for action in (["update"], ["download", *packages]):
        result = subprocess.run(["apt-get", *options, *action], cwd=work, capture_output=True, text=True,
                                timeout=600)
        if result.returncode:
            raise Missing(f"apt-get {' '.join(action)} from {suite} failed: {result.stderr[-500:]}")
    return sorted(work.glob("*.deb"))


def debian_packages(suite: str, packages: list[str]) -> list[Path]:
    """Packages of a Debian suite, each unpacked once into ENGINE_CACHE/SUITE/PACKAGE."""
    roots = [ENGINE_CACHE / suite / package for package in packages]
    missing = [root.name for root in roots if not root.exists()]
    if not missing:
        return roots
    if not shutil.which("apt-get") or not shutil.which("dpkg"):
        raise Missing(f"{', '.join(missing)} from Debian {suite} need apt-get and dpkg")
    (ENGINE_CACHE / suite).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".download-", dir=ENGINE_CACHE / suite) as directory:
        work = Path(directory)
        (work / "root").mkdir()
        for deb in apt_download(suite, missing, work):
            unpacked = work / "root" / deb.name.split("_")[0]
            subprocess.run(["dpkg", "-x", str(deb), str(unpacked)], check=True)
            # Test runs from other checkouts share the cache: the first to unpack a package wins.
            with contextlib.suppress(OSError):
                unpacked.rename(ENGINE_CACHE / suite / unpacked.name)
    return roots


@functools.cache
def report_clis() -> None:
    """Say once per run, in the test log, which docker CLIs the end-to-end classes drive."""
    versions = [subprocess.run([cli, "--version"], capture_output=True, text=True).stdout.strip() for cli in CLIS]
    print("end-to-end CLIs: " + "; ".join(f"{cli}: {version}" for cli, version in zip(CLIS, versions)),
          file=sys.stderr)


class EndToEnd:
    """The same tests against one engine; subclasses say which."""

    engine = ""
    suite = ""   # the Debian suite whose docker.io and containerd run this engine
    # vfs and native need no overlayfs, which fails where the data root is itself on overlayfs (a container).
    storage: tuple[str, ...] = ("--storage-driver=vfs",)
    image_mounts = False   # --mount type=image: API 1.48, Engine 28
    test_policy: dict[str, Any]

    # ---- fixture ---------------------------------------------------------

    @classmethod
    def setUpClass(cls) -> None:
        try:
            if UNIT_ONLY:
                raise Missing("DOCKER_IMAGE_POLICY_UNIT_ONLY=1 asks for the unit tests only")
            cls.require()
        except Missing as missing:
            if REQUIRE_E2E:
                raise AssertionError(f"end-to-end suite required but cannot run: {missing}") from None
            raise unittest.SkipTest(f"end-to-end ({cls.engine}): {missing}") from None
        cls.dir = Path(tempfile.mkdtemp(prefix="dip-e2e-"))
        cls.addClassCleanup(shutil.rmtree, cls.dir, ignore_errors=True)
        cls.processes: list[subprocess.Popen] = []
        cls.addClassCleanup(cls.stop_all)
        cls.start_registry()
        cls.name = f"dip-test-{os.getpid()}-{cls.engine.replace('.', '')}"
        cls.plugin_socket = Path(f"/run/docker/plugins/{cls.name}.sock")
        cls.docker_socket = cls.dir / "docker.sock"
        cls.config = cls.dir / "policy.json"
        cls.config.write_text(json.dumps({"defaultAllow": True}))   # seeding needs imports and pushes
        cls.start_plugin()
        cls.start_dockerd()
        report_clis()
        cls.report_engine()
        cls.seed()
        cls.test_policy = {
            "whitelist": [f"^{re.escape(cls.registry)}/allowed/", "^nginx:"],
            "blacklist": ["^redis:"], "defaultAllow": False,
            "message": "Ask the platform team for approved images.",
        }
        cls.apply_policy(cls.test_policy)

    @classmethod
    def require(cls) -> None:
        if os.geteuid() != 0:
            raise Missing("needs root (dockerd and /run/docker/plugins)")
        for tool in ("docker-registry", "busybox", "containerd"):
            if not shutil.which(tool):
                raise Missing(f"{tool} is not installed (apt-get install docker.io docker-registry busybox-static)")
        if not os.access(CLIS[0], os.X_OK):
            raise Missing(f"no docker CLI at {CLIS[0]} (apt-get install docker.io)")
        debian_packages("sid", ["docker-cli"])
        cls.dockerd, cls.path = cls.find_engine()

    @classmethod
    def find_engine(cls) -> tuple[str, str]:
        """The suite's dockerd and containerd, run with the machine's runc."""
        if not shutil.which("runc", path=os.environ.get("PATH", "") + ":/usr/sbin"):
            raise Missing("runc is not installed (apt-get install docker.io)")
        docker, containerd = debian_packages(cls.suite, ["docker.io", "containerd"])
        return (str(docker / "usr/sbin/dockerd"),
                f"{docker}/usr/sbin:{docker}/usr/bin:{containerd}/usr/bin:/usr/sbin:/usr/bin:/sbin:/bin")

    @classmethod
    def stop_all(cls) -> None:
        stop_processes(cls.processes)
        for mount in ("exec", "data", "containerd/state", "containerd/root"):
            subprocess.run(["umount", "-R", str(cls.dir / mount)], capture_output=True)
        with contextlib.suppress(FileNotFoundError):
            cls.plugin_socket.unlink()

    @classmethod
    def spawn(cls, command: list[str], log: str, **kwargs: Any) -> subprocess.Popen:
        with open(cls.dir / log, "ab") as output:
            process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, **kwargs)
        cls.processes.append(process)
        return process

    @classmethod
    def start_registry(cls) -> None:
        port = free_port()
        cls.registry = f"localhost:{port}"
        (cls.dir / "registry.yml").write_text(
            f"version: 0.1\nstorage:\n  filesystem:\n    rootdirectory: {cls.dir}/registry\n"
            f"http:\n  addr: 127.0.0.1:{port}\n")
        cls.spawn(["docker-registry", "serve", str(cls.dir / "registry.yml")], "registry.log")

        def up() -> bool:
            with contextlib.suppress(OSError):
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    return True
            return False
        wait_for(up, "the registry")

    @classmethod
    def start_plugin(cls, *options: str, config: Path | None = None) -> None:
        cls.admin_port = free_port()
        cls.plugin = cls.spawn(cls.plugin_command(*options, config=config), "plugin.log")
        wait_for(lambda: cls.admin_get("/health") == "HEALTHY", "the plugin")

    @classmethod
    def restart_plugin(cls, *options: str, config: Path | None = None) -> None:
        """Stop the plugin and start it again, as systemctl restart does."""
        cls.plugin.terminate()
        cls.plugin.wait(30)
        cls.start_plugin(*options, config=config)

    @classmethod
    def plugin_command(cls, *options: str, config: Path | None = None) -> list[str]:
        return [sys.executable, str(MODULE), "--config", str(config or cls.config), "--socket", str(cls.plugin_socket),
                "--addr", f"127.0.0.1:{cls.admin_port}", "--docker-host", f"unix://{cls.docker_socket}", *options]

    def replace_plugin(self, **popen: Any) -> subprocess.Popen:
        """Stop the class's plugin and start one with popen's arguments (its stderr, say), under the
        running dockerd; the cleanup starts one as the class does again."""
        cls = type(self)
        cls.plugin.terminate()
        cls.plugin.wait(30)
        cls.plugin = subprocess.Popen(self.plugin_command(), **popen)
        cls.processes.append(cls.plugin)

        def restore() -> None:
            cls.plugin.terminate()
            cls.plugin.wait(30)
            cls.start_plugin()
            cls.apply_policy(self.test_policy)
        self.addCleanup(restore)
        return cls.plugin

    def health(self) -> subprocess.CompletedProcess:
        return run_module("--health", "--socket", str(self.plugin_socket))

    @classmethod
    def admin_get(cls, path: str) -> str:
        connection = http.client.HTTPConnection("127.0.0.1", cls.admin_port, timeout=5)
        try:
            connection.request("GET", path)
            return connection.getresponse().read().decode()
        except OSError:
            return ""
        finally:
            connection.close()

    @classmethod
    def start_dockerd(cls) -> None:
        # A containerd of the engine's own generation, private to this test: dockerd
        # would otherwise use a system containerd whenever its socket exists.
        env = dict(os.environ, PATH=cls.path)
        containerd = cls.dir / "containerd"
        containerd.mkdir()
        # Only Kubernetes' CRI is disabled: the containerd image store needs the snapshotters.
        (containerd / "config.toml").write_text('version = 2\ndisabled_plugins = ["io.containerd.grpc.v1.cri"]\n')
        cls.spawn([shutil.which("containerd", path=cls.path) or "containerd", "--config", str(containerd / "config.toml"),
                   "--address", str(containerd / "sock"), "--root", str(containerd / "root"),
                   "--state", str(containerd / "state")], "containerd.log", env=env)
        wait_for((containerd / "sock").exists, "containerd")
        # The plugin is named in daemon.json, as the README says: a reload of dockerd re-reads it.
        cls.daemon_json = cls.dir / "daemon.json"
        cls.daemon_json.write_text(json.dumps({"authorization-plugins": [cls.name]}))
        # TLS with client certificates as well: dockerd then names the caller (team-a, team-b) to the plugin.
        pki = str(cls.dir / "pki")
        os.mkdir(pki)
        cls.ca = client_certificate(pki, "ca", "/CN=docker-image-policy test CA")
        server = client_certificate(pki, "server", "/CN=127.0.0.1", cls.ca)
        cls.clients = {team: client_certificate(pki, team, f"/O=Example/OU={team}/CN={team}-user", cls.ca)
                       for team in ("team-a", "team-b")}
        cls.tls_port = free_port()
        cls.dockerd_process = cls.spawn(
            [cls.dockerd, *cls.storage, "--iptables=false", "--ip-masq=false", "--bridge=none",
             "--data-root", str(cls.dir / "data"), "--exec-root", str(cls.dir / "exec"),
             "--pidfile", str(cls.dir / "docker.pid"), "-H", f"unix://{cls.docker_socket}",
             "-H", f"tcp://127.0.0.1:{cls.tls_port}", "--tlsverify", f"--tlscacert={cls.ca[1]}",
             f"--tlscert={server[1]}", f"--tlskey={server[0]}",
             f"--containerd={containerd / 'sock'}", f"--config-file={cls.daemon_json}"], "dockerd.log", env=env)
        wait_for(lambda: cls.docker(CLIS[0], "version").returncode == 0, "dockerd", timeout=60)

    @classmethod
    def report_engine(cls) -> None:
        """Say in the test log what this class tested: versions change with the Debian suites."""
        components = "{{range .Server.Components}}{{.Name}} {{.Version}}, {{end}}"
        print(f"end-to-end {cls.engine}: {cls.docker_ok('version', '--format', components)}"
              f" storage {cls.docker_ok('info', '--format', '{{.Driver}}')}", file=sys.stderr)

    @classmethod
    def docker(cls, cli: str, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        environment = dict(os.environ, DOCKER_CONFIG=str(cls.dir / "cli"), DOCKER_BUILDKIT="0", **(env or {}))
        return subprocess.run([cli, "-H", f"unix://{cls.docker_socket}", *args], capture_output=True, text=True,
                              timeout=120, env=environment)

    @classmethod
    def docker_as(cls, team: str, *args: str) -> subprocess.CompletedProcess:
        """The machine's CLI over TLS with team's client certificate."""
        key, certificate = cls.clients[team]
        return subprocess.run([CLIS[0], "-H", f"tcp://127.0.0.1:{cls.tls_port}", "--tlsverify",
                               f"--tlscacert={cls.ca[1]}", f"--tlscert={certificate}", f"--tlskey={key}", *args],
                              capture_output=True, text=True, timeout=120,
                              env=dict(os.environ, DOCKER_CONFIG=str(cls.dir / "cli")))

    @classmethod
    def docker_ok(cls, *args: str) -> str:
        result = cls.docker(CLIS[0], *args)
        if result.returncode:
            raise AssertionError(f"docker {' '.join(args)} failed: {result.stderr}")
        return result.stdout.strip()

    @classmethod
    def seed(cls) -> None:
        rootfs = cls.dir / "rootfs"
        (rootfs / "bin").mkdir(parents=True)
        shutil.copy(shutil.which("busybox"), rootfs / "bin/busybox")
        subprocess.run(["tar", "-C", str(rootfs), "-cf", str(cls.dir / "busybox.tar"), "bin"], check=True)
        for name in ("allowed", "denied"):
            cls.docker_ok("import", str(cls.dir / "busybox.tar"), f"{cls.registry}/{name}/busybox:1")
            cls.docker_ok("push", f"{cls.registry}/{name}/busybox:1")
        # An image present before the policy, under a name the policy refuses.
        cls.docker_ok("tag", f"{cls.registry}/denied/busybox:1", "smuggled:1")
        cls.docker_ok("save", "-o", str(cls.dir / "denied.tar"), f"{cls.registry}/denied/busybox:1")
        cls.docker_ok("rmi", f"{cls.registry}/allowed/busybox:1", f"{cls.registry}/denied/busybox:1")
        (cls.dir / "context").mkdir()
        (cls.dir / "context/Dockerfile").write_text(f"FROM {cls.registry}/allowed/busybox:1\n")

    @classmethod
    def apply_policy(cls, policy: dict[str, Any]) -> None:
        """Write a policy and reload it with SIGHUP, without restarting dockerd."""
        cls.config.write_text(json.dumps(policy))

        def reloads() -> int:
            return int(re.search(r'reloads_total\{outcome="success"\} (\d+)', cls.admin_get("/metrics"))[1])
        before = reloads()
        cls.plugin.send_signal(signal.SIGHUP)
        wait_for(lambda: reloads() > before, "the reload")
        assert json.loads(cls.admin_get("/config"))["whitelist"] == policy.get("whitelist", [])

    @classmethod
    @contextlib.contextmanager
    def seeding_policy(cls, seeding: dict[str, Any] | None = None) -> Iterator[None]:
        """Allow everything (or apply seeding) for a fixture step that the policy in force may refuse,
        then restore it."""
        policy = json.loads(cls.config.read_text())
        cls.apply_policy(seeding or {"defaultAllow": True})
        try:
            yield
        finally:
            cls.apply_policy(policy)

    @classmethod
    def swarm_init(cls) -> None:
        """Make the engine a single-node swarm manager, for the tests that need one (idempotent).

        Under the test policy with allowSwarm: true, the key that lets a host join a swarm.
        """
        if cls.docker_ok("info", "--format", "{{.Swarm.LocalNodeState}}") == "active":
            return
        with cls.seeding_policy(dict(cls.test_policy, allowSwarm=True)):
            cls.addClassCleanup(cls.leave_swarm)
            # A gateway bridge and a manager port of its own: a swarm on the host keeps
            # its docker_gwbridge interface and port 2377.
            cls.docker_ok("network", "create", "--opt", f"com.docker.network.bridge.name=dip-{cls.dir.name[-8:]}",
                          "docker_gwbridge")
            cls.docker_ok("swarm", "init", "--advertise-addr", "127.0.0.1", "--listen-addr",
                          f"127.0.0.1:{free_port()}")

    @classmethod
    def leave_swarm(cls) -> None:
        """Stop the service tasks now (dockerd's shutdown waits 10 s for each) and remove the bridge."""
        with cls.seeding_policy():
            cls.docker(CLIS[0], "swarm", "leave", "--force")   # there is no swarm if its init failed
            cls.docker_ok("network", "rm", "docker_gwbridge")

    # ---- helpers ---------------------------------------------------------

    def denied(self, result: subprocess.CompletedProcess, message: str) -> None:
        self.assertNotEqual(result.returncode, 0, result.stdout)
        self.assertIn(f"authorization denied by plugin {self.name}: {message}", result.stderr)

    def api(self, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None,
            chunked: bool = False) -> tuple[int, str]:
        """A raw request on dockerd's socket; dockerd may answer before reading all of the body."""
        head = f"{method} {path} HTTP/1.1\r\nHost: docker\r\nConnection: close\r\n"
        head += "".join(f"{key}: {value}\r\n" for key, value in (headers or {}).items())
        if chunked:
            head += "Transfer-Encoding: chunked\r\n"
            body = b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body) if body else b"0\r\n\r\n"
        else:
            head += f"Content-Length: {len(body)}\r\n"
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(60)
            sock.connect(str(self.docker_socket))
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                sock.sendall(head.encode() + b"\r\n" + body)
            response = http.client.HTTPResponse(sock)
            response.begin()
            return response.status, response.read().decode()

    def image_present(self, image: str) -> bool:
        return self.docker(CLIS[0], "image", "inspect", image).returncode == 0

    def remove(self, *images: str) -> None:
        for image in images:
            self.docker(CLIS[0], "rmi", "-f", image)

    # ---- tests -------------------------------------------------------------

    def test_allowed_pull_runs_with_every_cli(self):
        image = f"{self.registry}/allowed/busybox:1"
        for cli in CLIS:
            with self.subTest(cli):
                self.remove(image)
                result = self.docker(cli, "pull", image)
                self.assertEqual(result.returncode, 0, result.stderr)
                result = self.docker(cli, "run", "--rm", "--network", "none", image, "busybox", "echo", "ran " + cli)
                self.assertEqual((result.returncode, result.stdout), (0, f"ran {cli}\n"), result.stderr)

    def test_refused_pull_says_why(self):
        for cli in CLIS:
            with self.subTest(cli):
                result = self.docker(cli, "pull", f"{self.registry}/denied/busybox:1")
                self.denied(result, f"pull of {self.registry}/denied/busybox:1 denied: no whitelist rule matches"
                                    " and defaultAllow is false. Ask the platform team for approved images.")
                self.assertFalse(self.image_present(f"{self.registry}/denied/busybox:1"))

    def test_pull_of_all_tags(self):
        for cli in CLIS:
            with self.subTest(cli):
                self.denied(self.docker(cli, "pull", "--all-tags", f"{self.registry}/denied/busybox"),
                            f"pull (all tags) of {self.registry}/denied/busybox denied: a pull of all tags is allowed"
                            " only when a whitelist rule of the form ^prefix covers every tag")
                # "^localhost:PORT/allowed/" covers every tag of the allowed repository.
                result = self.docker(cli, "pull", "--all-tags", f"{self.registry}/allowed/busybox")
                self.assertEqual(result.returncode, 0, result.stderr)

    def test_go_era_posix_class_blacklist_denies(self):
        # Python's re read [[:alpha:]] as a set of ":ahlp" and a "]": this blacklist failed open.
        # dockerd asks the plugin before it contacts the registry, so the deny comes first.
        self.addCleanup(self.apply_policy, self.test_policy)
        allowed = f"{self.registry}/allowed/busybox:1"
        self.addCleanup(self.remove, allowed)
        self.apply_policy({"blacklist": ["^[[:alpha:]]+:latest$"], "defaultAllow": True})
        for cli in CLIS:
            with self.subTest(cli):
                self.denied(self.docker(cli, "pull", "nginx:latest"),
                            'pull of nginx:latest denied: blacklist rule "^[[:alpha:]]+:latest$" matches')
                self.remove(allowed)
                result = self.docker(cli, "pull", allowed)
                self.assertEqual(result.returncode, 0, result.stderr)

    def test_no_rule_stalls_the_docker_api(self):
        # Python's re took over a minute on this rule and one crafted name, while every API call waited.
        self.addCleanup(self.apply_policy, self.test_policy)
        self.apply_policy({"whitelist": [".*/.*/.*/.*/.*:latest$"], "defaultAllow": False})
        crafted = "a/" * 120 + "a:" + "b" * 128
        parse_reference(crafted)
        pulled: list[subprocess.CompletedProcess] = []
        started = time.monotonic()
        pull = threading.Thread(target=lambda: pulled.append(self.docker(CLIS[-1], "pull", crafted)))
        pull.start()
        listed = self.docker(CLIS[-1], "ps")
        listed_after = time.monotonic() - started
        pull.join(60)
        self.assertEqual(listed.returncode, 0, listed.stderr)
        self.denied(pulled[0], f"pull of {crafted} denied: no whitelist rule matches")
        self.assertLess(listed_after, 10)
        self.assertLess(time.monotonic() - started, 10)

    def test_familiar_rules_hold_for_old_and_new_clis(self):
        # CLI 20.10 sends "redis", CLI 28 "docker.io/library/redis": the same rule decides.
        for cli in CLIS:
            with self.subTest(cli):
                self.denied(self.docker(cli, "pull", "redis:7"), 'pull of redis:7 denied: blacklist rule "^redis:"')
                result = self.docker(cli, "pull", "nginx:no-such-tag-here")   # allowed; the Hub is not reachable
                self.assertNotEqual(result.returncode, 0)
                self.assertNotIn("authorization denied", result.stderr)

    def test_benign_commands_work(self):
        for cli in CLIS:
            for command in (["ps", "-a"], ["images"], ["info"], ["version"]):
                with self.subTest(cli=cli, command=command):
                    result = self.docker(cli, *command)
                    self.assertEqual(result.returncode, 0, result.stderr)

    def test_opaque_operations_are_refused(self):
        allowed = f"{self.registry}/allowed/busybox:1"
        self.docker_ok("pull", allowed)
        container = self.docker_ok("create", "--network", "none", allowed, "busybox", "true")
        self.addCleanup(self.docker, CLIS[0], "rm", "-f", container)
        for cli in CLIS:
            with self.subTest(cli):
                self.denied(self.docker(cli, "load", "-i", str(self.dir / "denied.tar")),
                            "load denied: 'allowLoad' is not set and defaultAllow is false")
                self.denied(self.docker(cli, "import", str(self.dir / "busybox.tar"), "imported:1"),
                            "import denied: 'allowImport'")
                self.denied(self.docker(cli, "build", "-t", "built:1", str(self.dir / "context")),
                            "build denied: 'allowBuild'")
                self.denied(self.docker(cli, "commit", container, "committed:1"), "commit denied: 'allowCommit'")
        for image in ("imported:1", "built:1", "committed:1"):
            self.assertFalse(self.image_present(image), image)

    def test_images_present_before_the_policy_cannot_run(self):
        image_id = self.docker_ok("image", "inspect", "--format", "{{.Id}}", "smuggled:1")
        for cli in CLIS:
            with self.subTest(cli):
                args = ["run", "--rm", "--network", "none"]
                self.denied(self.docker(cli, *args, "smuggled:1", "busybox", "true"),
                            "run of smuggled:1 denied: no whitelist rule matches")
                for reference in (image_id, image_id[len("sha256:"):][:12]):
                    self.denied(self.docker(cli, *args, reference, "busybox", "true"),
                                f"run of {reference} denied: none of its names is allowed")
                self.denied(self.docker(cli, "tag", "smuggled:1", f"{self.registry}/allowed/smuggled:1"),
                            "tag of smuggled:1 denied")
        self.assertFalse(self.image_present(f"{self.registry}/allowed/smuggled:1"))

    def test_crafted_api_requests_are_refused(self):
        denied = f"{self.registry}/denied/busybox"
        status, text = self.api("POST", f"/v1.41/images%2Fcreate?fromImage={denied}&tag=1")
        self.assertEqual(status, 403, text)
        self.assertIn(f"pull of {denied}:1 denied", text)
        status, text = self.api("POST", f"/v1.41/images/create?fromImage={self.registry}/allowed/busybox&tag=1",
                                body=f"fromImage={denied}&tag=1".encode(),
                                headers={"Content-Type": "application/x-www-form-urlencoded"})
        self.assertEqual(status, 403, text)
        self.assertIn("form-encoded body", text)
        self.assertFalse(self.image_present(f"{denied}:1"))
        # Over 1 MiB, or chunked: depending on the engine and its CVE-2024-41110 and
        # CVE-2026-34040 fixes, dockerd forwards the body or withholds it; refused either way.
        for padding, chunked in [(1536 * 1024, False), (0, True)]:
            body = json.dumps({"Image": "smuggled:1", "Cmd": ["busybox", "true"],
                               "Labels": {"padding": "x" * padding}}).encode()
            with self.subTest(size=len(body), chunked=chunked):
                status, text = self.api("POST", "/v1.41/containers/create", body=body,
                                        headers={"Content-Type": "application/json"}, chunked=chunked)
                self.assertEqual(status, 403, text)
                self.assertRegex(text, "run (of smuggled:1 )?denied: (no whitelist rule matches|dockerd did not forward)")
        # Over 4 MiB no engine forwards the body: even an allowed image is not created.
        body = json.dumps({"Image": f"{self.registry}/allowed/busybox:1", "Cmd": ["busybox", "true"],
                           "Labels": {"padding": "x" * (5 * 1024 * 1024)}}).encode()
        status, text = self.api("POST", "/v1.41/containers/create", body=body,
                                headers={"Content-Type": "application/json"})
        self.assertGreaterEqual(status, 400, text)
        if status == 403:
            self.assertIn("run denied: dockerd did not forward the request body", text)

    def test_callers_by_client_certificate_and_exceptions_that_end(self):
        image = f"{self.registry}/allowed/busybox:1"
        scope = f"{self.registry}/allowed"
        self.addCleanup(self.apply_policy, self.test_policy)
        self.addCleanup(self.remove, image)
        self.apply_policy({"scopes": [{"allow": scope, "callers": ["ou:team-a"]}],
                           "message": "Ask the platform team for approved images."})
        for team, allowed in [("team-a", True), ("team-b", False)]:
            with self.subTest(team):
                self.remove(image)
                result = self.docker_as(team, "pull", image)
                if allowed:
                    self.assertEqual(result.returncode, 0, result.stderr)
                    created = self.docker_as(team, "create", "--name", "dip-caller-run", image, "true")
                    self.assertEqual(created.returncode, 0, created.stderr)
                    self.docker_ok("rm", "dip-caller-run")
                else:
                    self.denied(result, f"pull of {image} denied: scope \"{scope}\" governs it and no entry"
                                        " there allows it")
                    self.assertIn("the caller is cn:team-b-user o:Example ou:team-b", result.stderr)
                    self.denied(self.docker_as(team, "create", image, "true"), f"run of {image} denied")
        result = self.docker(CLIS[0], "pull", image)   # the unix socket
        self.denied(result, f"pull of {image} denied")
        self.assertIn("the caller is unidentified", result.stderr)
        self.denied(self.docker(CLIS[0], "create", image, "true"), f"run of {image} denied")
        logged = [json.loads(line) for line in (self.dir / "plugin.log").read_text().splitlines()
                  if line.startswith("{") and '"caller"' in line]
        self.assertIn({"cn": "team-a-user", "o": ["Example"], "ou": ["team-a"], "unreadable": False},
                      [record["caller"] for record in logged])
        # An exception a few seconds long: allowed, then refused once it ends, with no reload.
        self.remove(image)
        ends = time.time() + 4
        until = datetime.datetime.fromtimestamp(ends, datetime.timezone.utc).isoformat()
        self.apply_policy({"scopes": [{"allow": scope, "until": until, "ticket": "SEC-1"}]})
        result = self.docker(CLIS[0], "pull", image)
        self.assertLess(time.time(), ends, "the pull took longer than the exception lasts")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.remove(image)
        time.sleep(max(0.0, ends - time.time()) + 0.1)   # the exception's end is a time: nothing else to wait on
        self.denied(self.docker(CLIS[0], "pull", image), f"pull of {image} denied")

    def test_reload_and_audit_without_restarting_dockerd(self):
        image = f"{self.registry}/denied/busybox:1"
        self.addCleanup(self.apply_policy, self.test_policy)
        self.addCleanup(self.remove, image)
        self.apply_policy(dict(self.test_policy, whitelist=self.test_policy["whitelist"] + ["/denied/"]))
        self.assertEqual(self.docker(CLIS[-1], "pull", image).returncode, 0)
        self.remove(image)
        self.apply_policy(dict(self.test_policy, mode="audit"))
        self.assertEqual(self.docker(CLIS[0], "pull", image).returncode, 0)
        expected = {"decision": "would-deny", "mode": "audit", "operation": "pull", "image": image}

        def logged() -> bool:   # decision lines are written in batches
            records = [json.loads(line) for line in (self.dir / "plugin.log").read_text().splitlines()
                       if line.startswith("{")]
            return expected in [{key: record[key] for key in expected} for record in records]
        wait_for(logged, "the would-deny line in the decision log", timeout=5)
        self.remove(image)
        self.apply_policy(self.test_policy)
        self.denied(self.docker(CLIS[0], "pull", image), f"pull of {image} denied")

    def test_migration_from_the_go_plugin_keeps_the_api_answering(self):
        """README, Migrating from the Go plugin: its example file, audit mode from the command line, then enforce."""
        go_file = self.dir / "go-plugin.json"
        go_file.write_text(ORIGINAL_README_CONFIG)
        result = subprocess.run([sys.executable, str(MODULE), "--config", str(go_file), "--validate"],
                                capture_output=True, text=True, timeout=60)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn("only the Go plugin's keys", result.stdout)
        self.addCleanup(self.restart_plugin)
        answered: list[int] = []
        failed: list[str] = []
        stop = threading.Event()

        def callers() -> None:   # a Docker user's calls while the plugin is replaced
            while not stop.is_set():
                result = self.docker(CLIS[0], "ps", "-q")
                answered.append(result.returncode)
                if result.returncode:
                    failed.append(result.stderr.strip())
        caller = threading.Thread(target=callers)
        caller.start()
        try:
            self.restart_plugin("--mode", "audit", config=go_file)
            status = json.loads(self.admin_get("/status"))
            self.assertEqual((status["mode"], status["modeFrom"]), ("audit", "--mode"))
            image = f"{self.registry}/denied/busybox:1"
            self.addCleanup(self.remove, image)
            self.assertEqual(self.docker(CLIS[0], "pull", image).returncode, 0)   # would-deny, allowed
            built = self.docker(CLIS[0], "build", "-q", "-t", "migration-build:1", str(self.dir / "context"))
            self.assertEqual(built.returncode, 0, built.stderr)
            self.remove(image, "migration-build:1")
            self.restart_plugin(config=go_file)   # the file has no "mode": enforce
            self.assertEqual(json.loads(self.admin_get("/status"))["modeFrom"], "default")
            restarted = len(answered)
            wait_for(lambda: len(answered) > restarted + 1, "two calls answered after the restart", timeout=60)
        finally:
            stop.set()
            caller.join()
        self.assertGreater(len(answered), 2)
        # Calls made while the plugin is down wait for it; only a call in flight on a connection the stopping
        # plugin closes can fail, at most one per restart (dockerd sends it again without its body), and the
        # calls after it are answered.
        self.assertLessEqual(len(failed), 2, failed)
        self.assertEqual(answered[-2:], [0, 0], failed)
        self.denied(self.docker(CLIS[0], "pull", image), f"pull of {image} denied")
        self.denied(self.docker(CLIS[0], "build", "-q", str(self.dir / "context")), "build denied")

    # ---- bodies, mounts, services and names read as dockerd reads them ----

    def image_id(self, image: str) -> str:
        return self.docker_ok("image", "inspect", "--format", "{{.Id}}", image)

    def create(self, body: dict[str, Any] | bytes, route: str = "/v1.41/containers/create") -> tuple[int, str]:
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        return self.api("POST", route, raw, headers={"Content-Type": "application/json"})

    def service_names(self) -> list[str]:
        return self.docker_ok("service", "ls", "--format", "{{.Name}}").split()

    def test_json_keys_fold_as_go_folds_them(self):
        allowed = f"{self.registry}/allowed/busybox:1"
        self.docker_ok("pull", allowed)
        # dotless i (U+0131) does not fold to "I" in Go: dockerd reads Image, the refused one.
        status, text = self.create(f'{{"Image":"smuggled:1","\u0131mage":"{allowed}","Cmd":["busybox","true"]}}'
                                   .encode())
        self.assertEqual(status, 403, text)
        self.assertIn("run of smuggled:1 denied", text)
        status, text = self.create({"Image": allowed, "Cmd": ["busybox", "true"]})   # the honest twin
        self.assertEqual(status, 201, text)
        self.docker_ok("rm", json.loads(text)["Id"])

    def test_image_mounts_are_judged(self):
        allowed = f"{self.registry}/allowed/busybox:1"
        self.docker_ok("pull", allowed)
        mount = lambda source: {"Image": allowed, "Cmd": ["busybox", "true"], "HostConfig": {
            "Mounts": [{"Type": "image", "Source": source, "Target": "/mnt"}]}}
        route = "/v1.48/containers/create"   # image mounts need API 1.48
        for source in ("smuggled:1", self.image_id("smuggled:1")):
            with self.subTest(source):
                status, text = self.create(mount(source), route)
                self.assertEqual(status, 403, text)
                self.assertIn(f"image mount of {source} denied", text)
        status, text = self.create(mount(allowed), route)   # the honest twin
        self.assertNotEqual(status, 403, text)
        if self.image_mounts:   # Engine 28 mounts the image; older engines reject the mount type
            self.assertEqual(status, 201, text)
            self.docker_ok("rm", json.loads(text)["Id"])
            cli = CLIS[-1]
            self.denied(self.docker(cli, "run", "--rm", "--network", "none", "--mount",
                                    "type=image,source=smuggled:1,target=/mnt", allowed, "busybox", "true"),
                        "image mount of smuggled:1 denied")
            result = self.docker(cli, "run", "--rm", "--network", "none", "--mount",
                                 f"type=image,source={allowed},target=/mnt", allowed, "busybox", "ls", "/mnt/bin")
            self.assertEqual((result.returncode, result.stdout), (0, "busybox\n"), result.stderr)

    def test_signed_scope_at_pull_and_at_run(self):
        try:
            cosign = cosign_tools()["2"]
        except Missing as missing:
            if REQUIRE_E2E:
                raise AssertionError(f"the signed-scope test is required but cannot run: {missing}") from None
            self.skipTest(f"cosign: {missing}")
        keys = self.dir / "cosign"
        keys.mkdir(exist_ok=True)
        env = dict(os.environ, COSIGN_PASSWORD="", HOME=str(keys), TUF_ROOT=str(keys / "tuf"))

        def cosign_ok(*args: str) -> None:
            result = subprocess.run([str(cosign), *args], env=env, capture_output=True, text=True, timeout=120)
            self.assertEqual(result.returncode, 0, result.stderr[-1000:])
        cosign_ok("generate-key-pair", "--output-key-prefix", str(keys / "release"))
        repository = f"{self.registry}/signed/busybox"
        registry = LocalRegistry.__new__(LocalRegistry)   # the class's registry, written to through its API
        registry.host = self.registry
        digests = {}
        with self.seeding_policy():
            for tag in ("v1", "v2"):   # two imports: two images, v1 signed and v2 not
                self.docker_ok("import", str(self.dir / "busybox.tar"), f"{repository}:{tag}")
                self.docker_ok("push", f"{repository}:{tag}")
                self.remove(f"{repository}:{tag}")
                digests[tag] = "sha256:" + hashlib.sha256(registry.call("GET", f"/v2/signed/busybox/manifests/{tag}", headers={
                    "Accept": ", ".join(dip.MANIFEST_TYPES)})[1]).hexdigest()
        cosign_ok("sign", "--key", str(keys / "release.key"), "--tlog-upload=false", "--allow-http-registry", "-y",
                  f"{repository}@{digests['v1']}")
        self.addCleanup(self.apply_policy, self.test_policy)
        self.addCleanup(self.remove, f"{repository}:v1", f"{repository}:v2", f"{repository}:copy",
                        f"{self.registry}/open/imported:1")
        open_scope = {"allow": f"{self.registry}/open"}
        signed = {"scopes": [{"allow": f"{self.registry}/signed", "signedBy": [str(keys / "release.pub")]},
                             open_scope], "defaultAllow": False, "allowImport": True}
        unsigned = {"scopes": [{"allow": f"{self.registry}/signed"}, open_scope], "defaultAllow": False}
        # An unsigned image pulled while the scope was unsigned: refused at run once it is signed.
        self.apply_policy(unsigned)
        self.docker_ok("pull", f"{repository}:v2")
        self.apply_policy(signed)
        self.denied(self.docker(CLIS[0], "create", f"{repository}:v2", "busybox", "true"),
                    f"run of {repository}:v2 denied")
        self.assertIn(f"no signature ({digests['v2']}, the digest image", self.docker(
            CLIS[0], "create", f"{repository}:v2", "busybox", "true").stderr)
        # A signed image pulls and runs, with every CLI; a retag within its repository keeps its digest.
        for cli in CLIS:
            with self.subTest(cli):
                self.remove(f"{repository}:v1")
                result = self.docker(cli, "pull", f"{repository}:v1")
                self.assertEqual(result.returncode, 0, result.stderr)
                result = self.docker(cli, "run", "--rm", "--network", "none", f"{repository}:v1", "busybox", "echo",
                                     "signed")
                self.assertEqual((result.returncode, result.stdout), (0, "signed\n"), result.stderr)
        self.docker_ok("tag", f"{repository}:v1", f"{repository}:copy")
        self.docker_ok("run", "--rm", "--network", "none", f"{repository}:copy", "busybox", "true")
        # An unsigned image is refused at pull, by digest and by tag, and when the registry moves a signed tag to it.
        self.denied(self.docker(CLIS[0], "pull", f"{repository}@{digests['v2']}"),
                    f"pull of {repository}@{digests['v2']} denied")
        for cli in CLIS:
            with self.subTest(cli):
                result = self.docker(cli, "pull", f"{repository}:v2")
                self.denied(result, f"pull of {repository}:v2 denied")
                self.assertIn(f"needs a signature by {keys / 'release.pub'}: no signature (tag v2 is {digests['v2']})",
                              result.stderr)
        moved = registry.call("GET", f"/v2/signed/busybox/manifests/{digests['v2']}",
                              headers={"Accept": ", ".join(dip.MANIFEST_TYPES)})[1]
        registry.push_manifest("signed/busybox", "moved", moved)
        self.denied(self.docker(CLIS[0], "pull", f"{repository}:moved"), f"pull of {repository}:moved denied")
        # An imported image retagged into the signed scope is refused: it was never pulled from there.
        self.docker_ok("import", str(self.dir / "busybox.tar"), f"{self.registry}/open/imported:1")
        result = self.docker(CLIS[0], "tag", f"{self.registry}/open/imported:1", f"{repository}:v1")
        self.denied(result, f"tag of {self.registry}/open/imported:1 as {repository}:v1 denied")
        self.assertIn(f"was not pulled from {repository}", result.stderr)
        self.docker_ok("run", "--rm", "--network", "none", f"{repository}:v1", "busybox", "true")   # still the signed one
        if self.image_mounts:
            self.denied(self.docker(CLIS[-1], "run", "--rm", "--network", "none", "--mount",
                                    f"type=image,source={repository}:v2,target=/mnt", f"{repository}:v1", "busybox",
                                    "true"), f"image mount of {repository}:v2 denied")
        # Services: the CLI pins the tag's digest, whose signature is checked; a tag alone is refused.
        self.swarm_init()
        result = self.docker(CLIS[0], "service", "create", "--detach", "--restart-condition", "none",
                             f"{repository}:v1", "busybox", "true")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.addCleanup(self.docker, CLIS[0], "service", "rm", result.stdout.strip())
        for flags, reason in [([], f"no signature ({digests['v2']})"),
                              (["--no-resolve-image"], "a swarm worker resolves a service's tag itself")]:
            result = self.docker(CLIS[0], "service", "create", "--detach", *flags, f"{repository}:v2", "busybox", "true")
            self.denied(result, "service of ")
            self.assertIn(reason, result.stderr)
        # --scan reports the unsigned image in the signed scope, and not the signed one.
        scan = run_module("--config", str(self.config), "--scan", "--docker-host", f"unix://{self.docker_socket}",
                          "--format", "json")
        refused = {finding["name"] for finding in json.loads(scan.stdout)["refused"]}
        self.assertIn(f"{repository}:v2", refused, scan.stderr)
        self.assertNotIn(f"{repository}:v1", refused)
        self.assertEqual(scan.returncode, 1)
        # --check asks the registry.
        check = run_module("--config", str(self.config), "--check", f"{repository}:v1", f"{repository}:v2")
        self.assertEqual(check.returncode, 1, check.stdout)
        self.assertIn("decision:  allow", check.stdout)
        self.assertIn(f"no signature (tag v2 is {digests['v2']})", check.stdout)

    def test_swarm_join_follows_allow_swarm(self):
        for cli in CLIS:
            with self.subTest(cli):
                self.denied(self.docker(cli, "swarm", "init", "--advertise-addr", "127.0.0.1"),
                            "swarm denied: 'allowSwarm' is not set and defaultAllow is false")
                self.denied(self.docker(cli, "swarm", "join", "--token", "SWMTKN-1-x", "127.0.0.1:2377"),
                            "swarm denied")
        self.swarm_init()   # allowSwarm: true lets it through
        self.assertEqual(self.docker_ok("info", "--format", "{{.Swarm.LocalNodeState}}"), "active")

    def test_services_are_judged_by_what_will_run(self):
        self.swarm_init()
        allowed = f"{self.registry}/allowed/busybox:1"
        self.docker_ok("pull", allowed)
        spec = lambda name, template: {"Name": name, "TaskTemplate": template}
        short_id = self.image_id("smuggled:1")[7:19]
        refused = [
            # A repeated TaskTemplate merges in Go: the container spec of the first one runs.
            (b'{"Name":"merged","TaskTemplate":{"ContainerSpec":{"Image":"smuggled:1"}},'
             b'"TaskTemplate":{"PluginSpec":{"Remote":"' + allowed.encode() + b'"}}}', "service of smuggled:1 denied"),
            (spec("by-id", {"ContainerSpec": {"Image": self.image_id("smuggled:1")}}),
             "denied: none of its names is allowed"),
            # The swarm pulls a short ID's name first, then runs the local image by ID.
            (spec("by-short-id", {"ContainerSpec": {"Image": short_id}}), f"service of {short_id}:latest denied"),
        ]
        for body, message in refused:
            with self.subTest(message):
                status, text = self.create(body, "/v1.41/services/create")
                self.assertEqual(status, 403, text)
                self.assertIn(message, text)
        self.assertEqual(self.service_names(), [])
        honest = b'{"Name":"honest","TaskTemplate":{"PluginSpec":{"Remote":"smuggled:1"}},' \
                 b'"TaskTemplate":{"ContainerSpec":{"Image":"' + allowed.encode() + b'"}}}'
        status, text = self.create(honest, "/v1.41/services/create")
        self.assertEqual(status, 201, text)
        status, text = self.create(spec("honest-id", {"ContainerSpec": {"Image": self.image_id(allowed)}}),
                                   "/v1.41/services/create")
        self.assertEqual(status, 201, text)
        self.assertEqual(sorted(self.service_names()), ["honest", "honest-id"])
        self.docker_ok("service", "rm", "honest", "honest-id")

    def test_rollback_is_judged_by_the_previous_spec(self):
        self.swarm_init()
        allowed = f"{self.registry}/allowed/busybox"
        self.addCleanup(self.apply_policy, self.test_policy)
        self.apply_policy(dict(self.test_policy, whitelist=self.test_policy["whitelist"] + ["^smuggled:"]))
        self.docker_ok("pull", f"{allowed}:1")   # its digest pins the update below
        for name, first in [("back-refused", "smuggled:1"), ("back-allowed", f"{allowed}:1")]:
            self.docker_ok("service", "create", "--detach", "--no-resolve-image", "--name", name, first,
                           "busybox", "sleep", "60")
            self.addCleanup(self.docker, CLIS[0], "service", "rm", name)
            self.docker_ok("service", "update", "--detach", "--no-resolve-image", "--image", f"{allowed}:1@"
                           + self.docker_ok("image", "inspect", "--format", "{{index .RepoDigests 0}}",
                                            f"{allowed}:1").split("@")[1], name)
        self.apply_policy(self.test_policy)
        self.denied(self.docker(CLIS[-1], "service", "rollback", "--detach", "back-refused"),
                    "service of smuggled:1 denied")
        result = self.docker(CLIS[-1], "service", "rollback", "--detach", "back-allowed")
        self.assertEqual(result.returncode, 0, result.stderr)
        image = self.docker_ok("service", "inspect", "--format", "{{.Spec.TaskTemplate.ContainerSpec.Image}}",
                               "back-refused")
        self.assertTrue(image.startswith(f"{allowed}:1@"), image)

    def test_form_body_is_asked_about_before_import(self):
        denied = f"{self.registry}/denied/busybox"
        self.addCleanup(self.apply_policy, self.test_policy)
        self.apply_policy(dict(self.test_policy, allowImport=True))
        form = {"Content-Type": "application/x-www-form-urlencoded"}
        status, text = self.api("POST", "/v1.41/images/create", f"fromImage={denied}&tag=1".encode(), headers=form)
        self.assertEqual(status, 403, text)
        self.assertIn("pull or import denied: a form-encoded body may override the query", text)
        self.assertFalse(self.image_present(f"{denied}:1"))
        self.addCleanup(self.remove, "imported:1")
        self.docker_ok("import", str(self.dir / "busybox.tar"), "imported:1")   # the honest twin
        # An empty form body hides nothing: a pull with one is judged by its query.
        allowed = f"{self.registry}/allowed/busybox"
        self.remove(f"{allowed}:1")
        status, text = self.api("POST", f"/v1.41/images/create?fromImage={allowed}&tag=1", b"", headers=form)
        self.assertEqual(status, 200, text)
        self.assertTrue(self.image_present(f"{allowed}:1"))
        status, text = self.api("POST", f"/v1.41/images/create?fromImage={denied}&tag=1", b"", headers=form)
        self.assertEqual(status, 403, text)

    def test_hex_names_are_judged_by_every_image_they_could_mean(self):
        allowed = f"{self.registry}/allowed/busybox:1"
        self.docker_ok("pull", allowed)
        ids = self.docker_ok("images", "--all", "--quiet", "--no-trunc").split()
        prefix = self.image_id("smuggled:1")[len("sha256:"):][:12]
        unused = next(hex for hex in (f"{n:04x}cafe" for n in range(4096))
                      if not any(i.removeprefix("sha256:").startswith(hex) for i in ids))
        self.addCleanup(self.apply_policy, self.test_policy)
        self.apply_policy(dict(self.test_policy, whitelist=self.test_policy["whitelist"] + ["^[0-9a-f]+:latest$"]))
        for name in (prefix, unused):
            self.docker_ok("tag", allowed, name)
            self.addCleanup(self.remove, name)
        # The name is an allowed image now; once it is removed, dockerd runs the refused image by ID prefix.
        self.denied(self.docker(CLIS[0], "run", "--rm", "--network", "none", prefix, "busybox", "true"),
                    f"run of {prefix} denied: none of its names is allowed")
        result = self.docker(CLIS[0], "run", "--rm", "--network", "none", unused, "busybox", "true")
        self.assertEqual(result.returncode, 0, result.stderr)
        # A hex name that is no image: dockerd answers 404 and the CLI pulls the name, which is judged.
        self.remove(unused)
        for cli in CLIS:
            with self.subTest(cli):
                result = self.docker(cli, "run", "--rm", "--network", "none", unused, "busybox", "true")
                self.assertNotEqual(result.returncode, 0)
                self.assertNotIn("authorization denied", result.stderr)   # no registry answers, nothing more
        self.apply_policy(self.test_policy)
        self.denied(self.docker(CLIS[0], "run", "--rm", "--network", "none", unused, "busybox", "true"),
                    f"run of {unused}:latest denied: no whitelist rule matches")

    def test_digest_pins_under_the_original_rules(self):
        allowed, pinned = f"{self.registry}/allowed/busybox:1", f"{self.registry}/pinned/busybox"
        self.docker_ok("pull", allowed)
        self.addCleanup(self.apply_policy, self.test_policy)
        self.apply_policy(dict(self.test_policy, whitelist=self.test_policy["whitelist"]
                               + [f"^{re.escape(pinned)}:"]))   # a rule written for the original plugin
        self.docker_ok("tag", allowed, f"{pinned}:1")
        self.docker_ok("push", f"{pinned}:1")
        digest = self.docker_ok("image", "inspect", "--format", "{{index .RepoDigests 0}}",
                                f"{pinned}:1").split("@")[1]
        for cli in CLIS:
            with self.subTest(cli):
                self.remove(f"{pinned}:1", f"{pinned}@{digest}")
                for command in (["pull"], ["run", "--rm", "--network", "none"]):
                    result = self.docker(cli, *command, f"{pinned}@{digest}", *(["busybox", "true"]
                                                                              if command[0] == "run" else []))
                    self.assertEqual(result.returncode, 0, result.stderr)
        self.remove(f"{pinned}:1", f"{pinned}@{digest}")

    def test_swarm_fixture_creates_services(self):
        # What the swarm tests build on: a single-node swarm that creates services from the registry.
        image = f"{self.registry}/allowed/busybox:1"
        self.swarm_init()
        self.swarm_init()
        for cli in CLIS:
            with self.subTest(cli):
                result = self.docker(cli, "service", "create", "--detach", "--restart-condition", "none",
                                     image, "busybox", "true")
                self.assertEqual(result.returncode, 0, result.stderr)
                service = result.stdout.strip()
                self.addCleanup(self.docker, CLIS[0], "service", "rm", service)
                self.assertRegex(self.docker_ok("service", "inspect", "--format",
                                                "{{.Spec.TaskTemplate.ContainerSpec.Image}}", service),
                                 f"^{re.escape(image)}@sha256:[0-9a-f]{{64}}$")

    def reload_dockerd(self, plugins: list[str]) -> None:
        """The README's load step: name the plugin in daemon.json, then systemctl reload docker (SIGHUP)."""
        self.daemon_json.write_text(json.dumps({"authorization-plugins": plugins}))
        with open(self.dir / "dockerd.log") as log:
            log.seek(0, os.SEEK_END)
            self.dockerd_process.send_signal(signal.SIGHUP)
            wait_for(lambda: "Reloaded configuration" in log.read(), "dockerd's reload")

    def test_readme_verification_tells_whether_dockerd_asks_the_plugin(self):
        # docker info may list no authorization plugin after a reload; the README's check asks the plugin itself.
        script = readme_block("**4. Verify**").replace("127.0.0.1:5006", f"127.0.0.1:{self.admin_port}")
        env = dict(os.environ, DOCKER_HOST=f"unix://{self.docker_socket}", DOCKER_CONFIG=str(self.dir / "cli"))
        verify = lambda: subprocess.run(["sh", "-c", script], capture_output=True, text=True, timeout=120, env=env)
        self.addCleanup(self.apply_policy, self.test_policy)
        self.addCleanup(self.reload_dockerd, [self.name])
        self.reload_dockerd([])
        # docker info names the plugins dockerd started with, not those its last reload loaded or removed.
        self.assertEqual(self.docker_ok("info", "--format", "{{.Plugins.Authorization}}"), f"[{self.name}]")
        result = verify()
        self.assertEqual((result.returncode, result.stdout), (1, "NOT verified: dockerd did not ask the plugin\n"),
                         result.stderr)
        self.reload_dockerd([self.name])
        result = verify()
        self.assertEqual((result.returncode, result.stdout), (0, "verified: dockerd asks the plugin\n"), result.stderr)
        self.assertIn(f"authorization denied by plugin {self.name}: pull of docker-image-policy.invalid/verify:1"
                      " denied", result.stderr)
        self.apply_policy(dict(self.test_policy, mode="audit"))   # the first step of the rollout
        result = verify()
        self.assertEqual((result.returncode, result.stdout), (0, "verified: dockerd asks the plugin\n"), result.stderr)
        self.assertNotIn("authorization denied", result.stderr)

    def test_reload_of_dockerd_loads_the_plugin_and_keeps_containers(self):
        # The README's rollout: name the plugin in daemon.json, then systemctl reload docker (SIGHUP).
        allowed, denied = f"{self.registry}/allowed/busybox:1", f"{self.registry}/denied/busybox:1"
        self.docker_ok("pull", allowed)
        container = self.docker_ok("run", "--detach", "--network", "none", allowed, "busybox", "sleep", "600")
        self.addCleanup(self.docker, CLIS[0], "rm", "--force", container)
        self.addCleanup(self.remove, denied)
        reload_dockerd = self.reload_dockerd
        self.addCleanup(reload_dockerd, [self.name])
        reload_dockerd([])
        self.assertEqual(self.docker(CLIS[0], "pull", denied).returncode, 0)   # no plugin: anything goes
        self.remove(denied)
        reload_dockerd([self.name])
        self.denied(self.docker(CLIS[0], "pull", denied), f"pull of {denied} denied")
        self.assertEqual(self.docker_ok("inspect", "--format", "{{.State.Running}}", container), "true")
        # A broken policy file: the reload fails visibly and the running policy stays.
        self.config.write_text('{"whitelist": [')
        self.plugin.send_signal(signal.SIGHUP)
        wait_for(lambda: "docker_image_policy_config_last_reload_successful 0" in self.admin_get("/metrics"),
                 "the failed reload in /metrics")
        self.assertIn("line 1 column 16: invalid JSON", json.loads(self.admin_get("/status"))["lastReload"]["error"])
        self.denied(self.docker(CLIS[-1], "pull", denied), f"pull of {denied} denied")
        self.apply_policy(self.test_policy)

    # ---- policy lifecycle: scan, check, replay, tests ------------------------

    def lifecycle(self, *args: str, policy: dict[str, Any] | None = None, **kwargs: Any) -> subprocess.CompletedProcess:
        """The module run on a candidate policy (the test policy unless given) against this engine."""
        path = self.dir / "candidate.json"
        path.write_text(json.dumps(policy or self.test_policy))
        return run_module("--config", str(path), "--docker-host", f"unix://{self.docker_socket}", *args, **kwargs)

    def test_scan_finds_refused_images_containers_and_services(self):
        self.swarm_init()
        allowed = f"{self.registry}/allowed/busybox:1"
        self.docker_ok("pull", allowed)
        with self.seeding_policy():
            nameless = self.docker_ok("import", str(self.dir / "busybox.tar"))
            self.addCleanup(self.remove, nameless)
            for name, image in [("scan-refused", "smuggled:1"), ("scan-allowed", allowed)]:
                self.docker_ok("create", "--network", "none", "--name", name, image, "busybox", "true")
                self.addCleanup(self.docker, CLIS[0], "rm", "-f", name)
            self.docker_ok("service", "create", "--detach", "--no-resolve-image", "--name", "scan-smuggler",
                           "smuggled:1", "busybox", "sleep", "60")
            self.addCleanup(self.docker, CLIS[0], "service", "rm", "scan-smuggler")
        result = self.lifecycle("--scan", "--format", "json")
        self.assertEqual(result.returncode, 1, result.stderr)
        document = json.loads(result.stdout)
        refused = {(finding["kind"], finding["name"]): finding for finding in document["refused"]}
        self.assertEqual(refused[("image", "smuggled:1")]["rule"], "defaultAllow")
        self.assertEqual(refused[("container", "scan-refused")]["reason"], "no whitelist rule matches and"
                                                                           " defaultAllow is false")
        self.assertEqual(refused[("service", "scan-smuggler")]["image"], "docker.io/library/smuggled:1")
        self.assertIn(nameless, [finding["id"] for finding in document["refused"] if finding["name"] == "<none>"])
        self.assertNotIn(("container", "scan-allowed"), refused)
        self.assertNotIn(("image", allowed), refused)
        self.assertEqual(document["scanned"]["services"], len(self.service_names()))
        text = self.lifecycle("--scan").stdout
        self.assertIn(f"container scan-refused (", text)
        self.assertIn("): run of smuggled:1 denied: no whitelist rule matches and defaultAllow is false"
                      " [defaultAllow]\n", text)
        lenient = dict(self.test_policy, whitelist=[".*"])
        self.assertEqual(self.lifecycle("--scan", policy=lenient).returncode, 1)   # nameless images stay refused
        self.assertEqual(self.lifecycle("--scan", policy=dict(lenient, checkRun=False)).returncode, 0)

    def test_check_judges_a_run_by_image_id_on_the_engine(self):
        allowed = f"{self.registry}/allowed/busybox:1"
        self.docker_ok("pull", allowed)
        result = self.lifecycle("--check", self.image_id("smuggled:1"), self.image_id(allowed)[7:19], "--operation",
                                "run", "--format", "json")
        self.assertEqual(result.returncode, 1, result.stderr)
        smuggled, honest = json.loads(result.stdout)
        self.assertEqual(smuggled["decision"], "deny")
        self.assertIn("none of its names is allowed", smuggled["reason"])
        self.assertEqual((honest["decision"], honest["canonical"]), ("allow", allowed))

    def test_replay_of_what_dockerd_served(self):
        log = self.dir / "plugin.log"
        start = len(log.read_bytes())
        allowed, denied = f"{self.registry}/allowed/busybox:1", f"{self.registry}/denied/busybox:1"
        smuggled = self.image_id("smuggled:1")
        self.remove(allowed)
        self.docker_ok("pull", allowed)
        self.denied(self.docker(CLIS[-1], "pull", denied), f"pull of {denied} denied")
        run = self.docker(CLIS[-1], "run", "--rm", "--network", "none", allowed, "busybox", "true")
        self.assertEqual(run.returncode, 0, run.stderr)
        self.denied(self.docker(CLIS[0], "run", "--rm", "--network", "none", smuggled, "busybox", "true"),
                    f"run of {smuggled} denied")
        wait_for(lambda: smuggled in log.read_bytes()[start:].decode(), "the decision lines", timeout=5)
        excerpt = self.dir / "excerpt.log"
        excerpt.write_bytes(log.read_bytes()[start:])
        candidate = dict(self.test_policy, whitelist=[f"^{re.escape(self.registry)}/denied/", "^nginx:"])
        result = self.lifecycle("--replay", str(excerpt), policy=candidate)
        self.assertEqual(result.returncode, 1, result.stderr)
        lines = result.stdout.splitlines()
        self.assertIn(f"{allowed}: allow -> deny, 2 times (pull 1, run 1): no whitelist rule matches and"
                      " defaultAllow is false [defaultAllow]", lines)
        self.assertIn(f"{denied}: deny -> allow, 1 time (pull 1): whitelist rule"
                      f" {json.dumps(candidate['whitelist'][0])} matches [whitelist[0]"
                      f" {json.dumps(candidate['whitelist'][0])}]", lines)
        self.assertRegex(lines[-1], r"^4 decisions replayed under .*: 3 would change \(2 allow -> deny, 1 deny ->"
                                    r" allow\) on 2 images, 0 unchanged; not decided again: 1 an image ID resolved at"
                                    r" the time; \d+ other lines$")
        same = self.lifecycle("--replay", "-", input=excerpt.read_text())
        self.assertEqual(same.returncode, 0, same.stdout)

    def test_replay_of_journald_exports_of_what_dockerd_served(self):
        log = self.dir / "plugin.log"
        start = len(log.read_bytes())
        allowed, denied = f"{self.registry}/allowed/busybox:1", f"{self.registry}/denied/busybox:1"
        self.remove(allowed)
        self.docker_ok("pull", allowed)
        self.denied(self.docker(CLIS[-1], "pull", denied), f"pull of {denied} denied")
        wait_for(lambda: denied in log.read_bytes()[start:].decode(), "the decision lines", timeout=5)
        host = f"engine-{self.engine}"
        exports = journal_exports(log.read_text()[start:].splitlines(), host, self.dir / "journal")
        candidate = dict(self.test_policy, whitelist=[f"^{re.escape(self.registry)}/denied/", "^nginx:"])
        changes = [f"{allowed}: allow -> deny, 1 time (pull 1): no whitelist rule matches and defaultAllow is false"
                   " [defaultAllow]",
                   f"{denied}: deny -> allow, 1 time (pull 1): whitelist rule {json.dumps(candidate['whitelist'][0])}"
                   f" matches [whitelist[0] {json.dumps(candidate['whitelist'][0])}]"]
        for export, text in exports.items():
            with self.subTest(export):
                path = self.dir / f"decisions.{export}"
                path.write_text(text)
                result = self.lifecycle("--replay", str(path), policy=candidate)
                self.assertEqual(result.returncode, 1, result.stderr)
                lines = result.stdout.splitlines()
                self.assertEqual(lines[:2], changes)
                self.assertRegex(lines[2], rf"^log {re.escape(str(path))}: decisions from \S+Z to \S+Z; hosts: "
                                 + ("not named" if export == "cat" else rf"{re.escape(host)} \(2\)$"))
                self.assertRegex(lines[3], r"^2 decisions replayed under .*: 2 would change")
        empty = self.dir / "empty.log"
        empty.write_text("")
        result = self.lifecycle("--replay", str(empty))
        self.assertEqual((result.returncode, result.stdout), (2, ""), result.stderr)

    def test_failed_reload_alerts_in_prometheus(self):
        # Prometheus scrapes the plugin in front of this dockerd and evaluates the README's alert rules.
        prometheus = tool("prometheus", "prometheus")
        work = self.dir / "prometheus"
        work.mkdir()
        (work / "rules.yml").write_text(readme_block("**The alert rules**"))
        (work / "prometheus.yml").write_text(json.dumps({   # YAML is a superset of JSON
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"}, "rule_files": [str(work / "rules.yml")],
            "scrape_configs": [{"job_name": "docker-image-policy",
                                "static_configs": [{"targets": [f"127.0.0.1:{self.admin_port}"]}]}]}))
        port = free_port()
        with open(work / "prometheus.log", "wb") as output:
            server = subprocess.Popen([prometheus, f"--config.file={work / 'prometheus.yml'}",
                                       f"--storage.tsdb.path={work / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
                                      stdout=output, stderr=subprocess.STDOUT)
        self.addCleanup(stop_processes, [server])

        def api(path: str) -> Any:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            try:
                connection.request("GET", path)
                return json.loads(connection.getresponse().read())["data"]
            except (OSError, ValueError):
                return None   # not up yet
            finally:
                connection.close()
        alerts = lambda: {alert["labels"]["alertname"]: alert["state"] for alert in (api("/api/v1/alerts") or
                                                                                    {"alerts": []})["alerts"]}
        scraped = lambda query: bool((api(f"/api/v1/query?query={quote(query)}") or {}).get("result"))
        wait_for(lambda: scraped("docker_image_policy_build_info == 1"), "Prometheus's first scrape", timeout=60)
        self.assertEqual(alerts(), {})   # one host, its policy in force
        self.addCleanup(self.apply_policy, self.test_policy)
        self.config.write_text('{"whitelist": [')
        self.plugin.send_signal(signal.SIGHUP)
        wait_for(lambda: alerts().get("DockerImagePolicyReloadFailed") == "firing", "the failed-reload alert", timeout=30)
        self.assertEqual(alerts(), {"DockerImagePolicyReloadFailed": "firing"})   # and not the one for no reload
        status = json.loads(self.admin_get("/status"))
        self.assertEqual((status["lastReload"]["ok"], status["fileOnDisk"]["inForce"]), (False, False))
        self.denied(self.docker(CLIS[0], "pull", f"{self.registry}/denied/busybox:1"),
                    f"pull of {self.registry}/denied/busybox:1 denied")   # the running policy stays
        self.apply_policy(self.test_policy)
        wait_for(lambda: "DockerImagePolicyReloadFailed" not in alerts(), "the alert to resolve", timeout=30)

    def test_a_policy_whose_tests_fail_is_not_loaded(self):
        def reloads(outcome: str) -> int:
            return int(re.search(rf'reloads_total\{{outcome="{outcome}"\}} (\d+)', self.admin_get("/metrics"))[1])
        self.addCleanup(self.apply_policy, self.test_policy)
        failing = dict(self.test_policy, whitelist=[".*"], tests=[
            {"image": f"{self.registry}/denied/busybox:1", "expect": "deny"}])
        self.assertEqual(self.lifecycle("--validate", policy=failing).returncode, 2)
        before = reloads("failure")
        self.config.write_text(json.dumps(failing))
        self.plugin.send_signal(signal.SIGHUP)
        wait_for(lambda: reloads("failure") > before, "the refused reload")
        self.denied(self.docker(CLIS[0], "pull", f"{self.registry}/denied/busybox:1"),
                    f"pull of {self.registry}/denied/busybox:1 denied")   # the running policy stays
        self.assertIn('"tests": 1 of 1 tests fail: "tests"[0]', (self.dir / "plugin.log").read_text())

    def test_admin_port_held_by_another_user(self):
        # An unprivileged user listens on the admin port first, and answers /health as the plugin would.
        type(self).admin_port = free_port()
        squatter = subprocess.Popen(
            ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", sys.executable, "-c",
             "import http.server, sys\n"
             "class Liar(http.server.BaseHTTPRequestHandler):\n"
             "    def do_GET(self):\n"
             "        self.send_response(200); self.end_headers(); self.wfile.write(b'HEALTHY')\n"
             "    def log_message(self, *args):\n"
             "        pass\n"
             "server = http.server.HTTPServer(('127.0.0.1', int(sys.argv[1])), Liar)\n"
             "print('listening', flush=True)\n"
             "server.serve_forever()\n", str(self.admin_port)], stdout=subprocess.PIPE, text=True)
        self.addCleanup(squatter.stdout.close)
        self.addCleanup(stop_processes, [squatter])
        self.assertEqual(squatter.stdout.readline(), "listening\n")
        log = self.dir / "plugin.log"
        start = len(log.read_bytes())
        with open(log, "ab") as output:
            self.replace_plugin(stderr=output)
        wait_for(lambda: "the plugin answers" in self.health().stdout, "the plugin socket")
        # dockerd keeps answering, with the plugin enforcing.
        denied = f"{self.registry}/denied/busybox:1"
        self.denied(self.docker(CLIS[0], "pull", denied), f"pull of {denied} denied")
        self.assertEqual(self.docker(CLIS[-1], "ps").returncode, 0)
        self.assertEqual(self.admin_get("/health"), "HEALTHY")   # the squatter's answer
        health = self.health()
        self.assertEqual(health.returncode, 1, health.stdout)
        self.assertIn(f"but its admin listener is not bound on 127.0.0.1:{self.admin_port} after", health.stdout)
        self.assertIn(f"error: cannot listen on 127.0.0.1:{self.admin_port}: [Errno 98] Address already in use;"
                      " the plugin socket serves dockerd", log.read_bytes()[start:].decode())
        squatter.terminate()
        squatter.wait(10)
        wait_for(lambda: self.health().returncode == 0, "the plugin's own admin listener")
        status = json.loads(self.admin_get("/status"))
        self.assertEqual(status["admin"]["listening"], True)
        self.assertGreaterEqual(status["admin"]["failedBinds"], 1)
        self.assertIn(f"admin_bind_failures_total {status['admin']['failedBinds']}\n", self.admin_get("/metrics"))
        self.assertNotIn("Traceback", log.read_bytes()[start:].decode())

    def test_flood_of_bodies_of_many_values(self):
        # Container bodies of 1.3 million empty mounts (3.9 MB: dockerd 28.5 forwards bodies under 4 MiB),
        # sixteen at once: denied without decoding them, a few at a time, in bounded memory.
        with open(self.dir / "plugin.log", "ab") as output:
            plugin = self.replace_plugin(stderr=output)
        wait_for(lambda: self.health().returncode == 0, "the plugin")
        body = json.dumps({"Image": f"{self.registry}/allowed/busybox:1", "HostConfig": {"Mounts": [{}] * 1_300_000}},
                          separators=(",", ":")).encode()
        answers: list[tuple[int, str]] = []

        def create() -> None:
            answers.append(self.api("POST", "/v1.41/containers/create", body, {"Content-Type": "application/json"}))
        threads = [threading.Thread(target=create) for _ in range(16)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(300)
        self.assertEqual(len(answers), 16)
        for status, text in answers:
            self.assertEqual(status, 403, text[:300])
            self.assertRegex(text, "more than any container or service dockerd creates|did not forward the request"
                                   " body")
        peak = int(re.search(r"^VmHWM:\s+(\d+) kB$", Path(f"/proc/{plugin.pid}/status").read_text(), re.M)[1])
        print(f"end-to-end {self.engine}: 16 bodies of 1.3 million values at once: peak resident {peak / 1024:.0f} MB",
              file=sys.stderr)
        self.assertLess(peak, 200 * 1024)   # before: about 210 MB for each request in flight
        self.assertEqual(self.docker(CLIS[0], "ps").returncode, 0)

    def test_flood_of_long_requests_under_a_stalled_stderr(self):
        reader, writer = os.pipe()   # a stderr nobody reads, already full
        self.addCleanup(os.close, reader)
        os.set_blocking(writer, False)
        for chunk in (b"x" * 4096, b"x"):
            with contextlib.suppress(BlockingIOError):
                while True:
                    os.write(writer, chunk)
        os.set_blocking(writer, True)
        plugin = self.replace_plugin(stderr=writer)
        os.close(writer)
        wait_for(lambda: self.health().returncode == 0, "the plugin")
        # 1,000 requests of 900 KB: a query whose reason would otherwise embed all of it.
        query = "fromImage=%zz" + "\u00ff" * ((900_000 - 40) // 2)
        answers: list[tuple[int, str]] = []

        def flood() -> None:
            for _ in range(250):
                answers.append(self.api("POST", "/v1.41/images/create?" + query))
        threads = [threading.Thread(target=flood) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(600)
        self.assertEqual(len(answers), 1000)
        for status, text in answers:
            self.assertEqual(status, 403, text[:200])
            self.assertIn("characters)", text)
            self.assertLess(len(text), 1024)
        self.assertEqual(self.docker(CLIS[0], "ps").returncode, 0)   # stderr is still stalled
        peak = int(re.search(r"^VmHWM:\s+(\d+) kB$", Path(f"/proc/{plugin.pid}/status").read_text(), re.M)[1])
        dropped = int(re.search(r"^docker_image_policy_log_lines_dropped_total (\d+)$", self.admin_get("/metrics"),
                                re.M)[1])
        print(f"end-to-end {self.engine}: 1,000 requests of 900 KB with stderr stalled: peak resident"
              f" {peak / 1024:.0f} MB, {dropped} log lines dropped", file=sys.stderr)
        self.assertLess(peak, 100 * 1024)
        self.assertGreater(dropped, 0)
        output = bytearray()   # journald reads again

        def drain() -> None:
            while chunk := os.read(reader, 1 << 16):
                output.extend(chunk)
        threading.Thread(target=drain, daemon=True).start()
        wait_for(lambda: b"log lines dropped" in output, "the dropped-lines warning")
        lines = bytes(output).lstrip(b"x").decode().splitlines()
        warned = sum(int(n) for n in re.findall(r"^docker-image-policy: warning: (\d+) log lines dropped", "\n".join(lines),
                                                re.M))
        self.assertEqual(warned, dropped)
        decisions = [json.loads(line) for line in lines if line.startswith("{")]
        self.assertEqual(sum("invalid %-escape" in decision["reason"] for decision in decisions) + dropped, 1000)
        longest = max(len(line.encode()) for line in lines)
        print(f"end-to-end {self.engine}: longest log line {longest} bytes", file=sys.stderr)
        self.assertLess(longest, 16 * 1024)

    @unittest.skipUnless(LONG or REQUIRE_E2E, "takes a minute or two per engine: DOCKER_IMAGE_POLICY_LONG=1"
                                              " (CI runs it)")
    def test_downtime_as_a_user_sees_it(self):
        # What a docker CLI call sees while the plugin is stopped (socket removed, as systemctl stop
        # leaves it) and after a crash (its socket left behind): how long until it fails, and the message.
        cls, image = type(self), f"{self.registry}/denied/busybox:1"
        self.addCleanup(cls.apply_policy, self.test_policy)
        self.addCleanup(lambda: cls.plugin.poll() is None or cls.start_plugin())
        for case in ("stopped", "crashed"):
            cls.plugin.send_signal(signal.SIGTERM if case == "stopped" else signal.SIGKILL)
            cls.plugin.wait()
            self.assertEqual(cls.plugin_socket.exists(), case == "crashed")
            results: dict[tuple[str, str], tuple[float, subprocess.CompletedProcess]] = {}

            def call(cli: str, *args: str) -> None:
                started = time.monotonic()
                result = self.docker(cli, *args)
                results[(("20.10", "28.5")[CLIS.index(cli)], args[0])] = (
                    time.monotonic() - started, result)
            calls = [threading.Thread(target=call, args=(cli, *args)) for cli in CLIS for args in (["ps"], ["pull", image])]
            for thread in calls:
                thread.start()
            for thread in calls:
                thread.join(300)
            for (cli, command), (seconds, result) in sorted(results.items()):
                self.assertNotEqual(result.returncode, 0, result.stdout)
                self.assertTrue(25 < seconds < 60, seconds)   # the README's table says 32 s or 45 s
                message = result.stderr.strip().splitlines()[-1].replace(str(cls.plugin_socket), "SOCKET")
                print(f"downtime {self.engine} {case} CLI {cli} docker {command}: {seconds:.1f} s: {message}",
                      file=sys.stderr)
            self.assertEqual(len(results), 4)
            cls.start_plugin()
            self.assertFalse(self.image_present(image))
        self.assertEqual(self.docker(CLIS[0], "ps").returncode, 0)

    def test_restart_plugin_under_running_dockerd(self):
        cls = type(self)
        allowed = f"{self.registry}/allowed/busybox:1"
        self.addCleanup(self.remove, allowed)
        cls.plugin.kill()   # leaves its socket behind, as a crash would
        cls.plugin.wait()
        self.assertTrue(cls.plugin_socket.exists())
        image = f"{self.registry}/denied/busybox:1"
        results: dict[str, subprocess.CompletedProcess] = {}
        calls = [threading.Thread(target=lambda: results.update(pull=self.docker(CLIS[0], "pull", image))),
                 threading.Thread(target=lambda: results.update(ps=self.docker(CLIS[-1], "ps")))]
        with open(self.dir / "dockerd.log") as log:
            log.seek(0, os.SEEK_END)
            for call in calls:
                call.start()
            # pkg/plugins' callWithRetry warns at each failed connect: both calls have reached the plugin's socket.
            logged: list[str] = []
            wait_for(lambda: logged.append(log.read()) or "".join(logged).count("Unable to connect to plugin") >= 2,
                     "dockerd's retries of both calls")
        self.assertEqual(results, {})   # dockerd holds the calls while the plugin is gone
        cls.start_plugin()              # over the stale socket
        cls.apply_policy(self.test_policy)
        for call in calls:
            call.join(120)
        self.assertNotEqual(results["pull"].returncode, 0)
        self.assertFalse(self.image_present(image))
        self.assertEqual(self.docker(CLIS[0], "ps").returncode, 0)
        self.assertEqual(self.docker(CLIS[-1], "pull", allowed).returncode, 0)


class TestEndToEndEngine20(EndToEnd, unittest.TestCase):
    """Debian bookworm's docker.io (Engine 20.10), the machine's."""

    engine = "20.10"

    @classmethod
    def find_engine(cls) -> tuple[str, str]:
        dockerd = shutil.which("dockerd") or shutil.which("dockerd", path="/usr/sbin")
        if not dockerd:
            raise Missing("dockerd is not installed (apt-get install docker.io)")
        return dockerd, os.environ.get("PATH", "") + ":/usr/sbin:/sbin"


class TestEndToEndEngine26(EndToEnd, unittest.TestCase):
    """Debian trixie's docker.io and containerd (Engine 26.1)."""

    engine = "26.1"
    suite = "trixie"


class TestEndToEndEngine28(EndToEnd, unittest.TestCase):
    """Debian sid's docker.io and containerd (Engine 28.5)."""

    engine = "28.5"
    suite = "sid"
    image_mounts = True


class TestEndToEndEngine28Containerd(TestEndToEndEngine28):
    """Engine 28.5 with the containerd image store, the default of new installations since Engine 29."""

    engine = "28.5-containerd"
    storage = ("--feature", "containerd-snapshotter=true", "--storage-driver=native")


class TestDebianSource(unittest.TestCase):
    """The Debian archive for the engines' downloads, from apt sources in either format."""

    def apt(self, files: dict[str, str]) -> Path:
        apt = Path(tempfile.mkdtemp(prefix="dip-apt-"))
        self.addCleanup(shutil.rmtree, apt)
        (apt / "sources.list.d").mkdir()
        for name, text in files.items():
            (apt / name).write_text(text)
        return apt

    def test_deb822_stanza(self):
        apt = self.apt({"sources.list.d/debian.sources":
                        "Types: deb\nURIs: http://deb.debian.org/debian\nSuites: bookworm bookworm-updates\n"
                        "Components: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n\n"
                        "Types: deb\nURIs: http://deb.debian.org/debian-security\nSuites: bookworm-security\n"
                        "Components: main\n"})
        self.assertEqual(debian_source("sid", apt), (
            "debian.sources", "Types: deb\nURIs: http://deb.debian.org/debian\nSuites: sid\nComponents: main\n"
                              "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n"))

    def test_one_line_entry(self):
        apt = self.apt({"sources.list": "deb-src http://deb.debian.org/debian bookworm main\n"
                                        "deb http://security.debian.org/debian-security bookworm-security main\n",
                        "sources.list.d/mirror.list":
                        "# deb http://old.example/debian buster main\n"
                        "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://ftp.de.debian.org/debian/"
                        " bookworm main contrib\ndeb http://ftp.de.debian.org/debian/ bookworm-updates main\n"})
        self.assertEqual(debian_source("trixie", apt), (
            "debian.list", "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg]"
                           " http://ftp.de.debian.org/debian/ trixie main contrib\n"))

    def test_no_debian_archive(self):
        apt = self.apt({"sources.list.d/cloud.list": "deb https://packages.example/apt cloud-sdk main\n"})
        with self.assertRaisesRegex(Missing, "no Debian archive in the apt sources under"):
            debian_source("sid", apt)


# --------------------------------------------------------------------------
# Benchmark (not a test): python3 test_docker_image_policy.py benchmark
# --------------------------------------------------------------------------

def benchmark(argv: list[str]) -> int:
    """Side-by-side throughput and latency of this plugin and the Go peer."""
    import argparse
    import statistics
    parser = argparse.ArgumentParser(prog="test_docker_image_policy.py benchmark")
    parser.add_argument("--shared", metavar="DIR", default=str(HERE.parent / "shared"),
                        help="directory holding peers/go-image-policy and tools/authzload (default: %(default)s)")
    parser.add_argument("--duration", metavar="SECONDS", type=float, default=3.0, help="(default: %(default)s)")
    parser.add_argument("--rounds", metavar="N", type=int, default=3,
                        help="alternating rounds per figure; medians are reported (default: %(default)s)")
    parser.add_argument("--no-dockerd", action="store_true", help="skip the runs through a real dockerd")
    parser.add_argument("--rules-only", action="store_true", help="only the rules that could stall a decision")
    parser.add_argument("--socket-only", action="store_true",
                        help="only the plugin socket's mixed loads, with one process and with worker processes")
    args = parser.parse_args(argv)
    sys.stdout.reconfigure(line_buffering=True)
    if args.rules_only:
        benchmark_rules()
        return 0
    work = Path(tempfile.mkdtemp(prefix="dip-bench-"))
    processes: list[subprocess.Popen] = []
    try:
        for name, source in [("peer", "peers/go-image-policy"), ("authzload", "tools/authzload")]:
            subprocess.run(["go", "build", "-o", str(work / name), "."], cwd=Path(args.shared) / source, check=True,
                           env=dict(os.environ, GOFLAGS="-mod=mod", GOCACHE=str(work / "gocache")))
        load = str(work / "authzload")
        # The interpreter the service runs, when the machine has it.
        python = "/usr/bin/python3" if os.access("/usr/bin/python3", os.X_OK) else sys.executable
        version = subprocess.run([python, "--version"], capture_output=True, text=True).stdout.strip()
        print(f"{python} ({version}), {os.cpu_count()} CPUs, {args.rounds} alternating rounds of {args.duration:g} s,"
              " medians")

        def start(kind: str, config: dict[str, Any], socket_path: Path) -> subprocess.Popen:
            path = work / f"{socket_path.stem}.json"
            path.write_text(json.dumps(config))
            with contextlib.suppress(FileNotFoundError):
                socket_path.unlink()
            if kind == "python":
                command = [python, str(MODULE), "--config", str(path), "--socket", str(socket_path),
                           "--addr", "127.0.0.1:0"]
            elif kind == "workers":
                command = [python, __file__, "forked-workers", str(path), str(socket_path), str(BENCHMARK_WORKERS)]
            else:
                command = [str(work / "peer"), "-config", str(path), "-socket", str(socket_path)]
            with open(work / f"{socket_path.stem}.log", "ab") as log:
                process = subprocess.Popen(command, stderr=log)
            processes.append(process)
            wait_for(socket_path.exists, f"{kind} plugin socket")
            time.sleep(0.3)
            return process

        def stop(process: subprocess.Popen) -> None:
            process.terminate()
            process.wait()

        def measure(socket_path: Path, *flags: str) -> dict[str, float]:
            output = subprocess.run([load, "-socket", str(socket_path), "-d", f"{args.duration}s", *flags],
                                    capture_output=True, text=True, check=True).stdout
            return {k: float(v) for k, v in re.findall(r"(\w+)=([\d.]+)", output)}

        def compare(title: str, ours: Path, peer: Path, *flags: str) -> None:
            runs: dict[str, list[dict[str, float]]] = {"python": [], "go": []}
            for _ in range(args.rounds):
                runs["python"].append(measure(ours, *flags))
                runs["go"].append(measure(peer, *flags))
            medians = {kind: {key: statistics.median(run[key] for run in kind_runs) for key in ("rps", "p50_us", "p99_us")}
                       for kind, kind_runs in runs.items()}
            python, go = medians["python"], medians["go"]
            print(f"{title:<44} {python['rps']:>9.0f} {python['p50_us']:>6.0f} {python['p99_us']:>6.0f}"
                  f"   {go['rps']:>9.0f} {go['p50_us']:>6.0f} {go['p99_us']:>6.0f}   {python['rps'] / go['rps']:>5.2f}x")

        print(f"{'':<44} {'python rps':>9} {'p50us':>6} {'p99us':>6}   {'go rps':>9} {'p50us':>6} {'p99us':>6}   ratio")
        sockets = {"python": work / "py.sock", "go": work / "go.sock"}
        mixed = {kind: start(kind, ORIGINAL_CONFIG, path) for kind, path in sockets.items()}
        for awake in (False, True) if os.access(CPU_DMA_LATENCY, os.W_OK) else (False,):
            with cpus_kept_awake() if awake else contextlib.nullcontext():
                if awake:
                    print("the same, with no CPU idle state allowed (CPUs poll instead of halting)")
                for connections in (1, 4):
                    compare(f"plugin socket, mixed load, {connections} connection(s)", sockets["python"],
                            sockets["go"], "-c", str(connections))
                # Every pull and create with its own tag: nothing can be answered from memory.
                for connections in (1, 4):
                    compare(f"plugin socket, mixed, all distinct, {connections} conn", sockets["python"],
                            sockets["go"], "-c", str(connections), "-unique")
        for process in mixed.values():
            stop(process)
        benchmark_workers(work, python, load, args, start, stop)
        if args.socket_only:
            return 0
        own_rps = {}
        for count in (10, 1000, 10000):
            rules = [f"^registry-{i}\\.example\\.com/" if i % 10 else f"^docker\\.io/team-{i}/app-[0-9]+:v"
                     for i in range(count)]
            config = {"whitelist": rules, "defaultAllow": False}
            pair = {kind: start(kind, config, path) for kind, path in sockets.items()}
            compare(f"pulls only, {count} whitelist rules, 1 conn", sockets["python"], sockets["go"],
                    "-c", "1", "-pull", "100", "-image", "evil")
            own_rps[count] = measure(sockets["python"], "-c", "1", "-pull", "100", "-image", "evil")["rps"]
            rss = int(re.search(r"VmRSS:\s+(\d+)", Path(f"/proc/{pair['python'].pid}/status").read_text())[1])
            print(f"{'':<44} resident memory of the python plugin: {rss / 1024:.1f} MB")
            for process in pair.values():
                stop(process)
        print(f"{'':<44} 10,000 rules vs 10 rules (python): {own_rps[10000] / own_rps[10]:.2f}x")
        # Scopes beside the Go peer's regex rules: the same registries and repositories, as scope entries.
        for count in (10, 10000):
            rules = [f"^registry-{i}\\.example\\.com/" if i % 10 else f"^docker\\.io/team-{i}/app-[0-9]+:v"
                     for i in range(count)]
            scopes = [{"allow": f"registry-{i}.example.com"} if i % 10 else
                      {"allow": f"docker.io/team-{i}/app", "tags": ["v*"]} for i in range(count)]
            pair = {"python": start("python", {"scopes": scopes}, sockets["python"]),
                    "go": start("go", {"whitelist": rules}, sockets["go"])}
            compare(f"pulls only, {count} scopes (go: rules), 1 conn", sockets["python"], sockets["go"],
                    "-c", "1", "-pull", "100", "-image", "evil")
            compare(f"pulls only, {count} scopes, distinct, 1 conn", sockets["python"], sockets["go"],
                    "-c", "1", "-pull", "100", "-image", "evil", "-unique")
            for process in pair.values():
                stop(process)
        # Repeated pulls are answered from the decision memory; this is the rule evaluation itself.
        for count in (10, 1000, 10000):
            rules = [f"^registry-{i}\\.example\\.com/" if i % 10 else f"^docker\\.io/team-{i}/app-[0-9]+:v"
                     for i in range(count)]
            policy = policy_of({"whitelist": rules})
            references = [parse_reference(f"evil:1.{i}") for i in range(100)]
            started = time.perf_counter()
            for reference in references * 10:
                policy.evaluate(reference)
            indexed = (time.perf_counter() - started) / 1000
            compiled = [re.compile(rule) for rule in rules]
            started = time.perf_counter()
            for reference in references[:10]:
                any(rule.search(form) for rule in compiled for form in (reference.canonical, reference.familiar))
            loop = (time.perf_counter() - started) / 10
            print(f"rule evaluation, {count} rules, not remembered:  indexed {indexed * 1e6:8.1f} us"
                  f"   rule by rule {loop * 1e6:8.1f} us")
            scoped = policy_of({"scopes": [{"allow": f"registry-{i}.example.com"} if i % 10 else
                                           {"allow": f"docker.io/team-{i}/app", "tags": ["v*"]} for i in range(count)]})
            started = time.perf_counter()
            for reference in references * 10:
                scoped.evaluate(reference)
            print(f"scope evaluation, {count} entries, not remembered: {(time.perf_counter() - started) / 1000 * 1e6:8.1f} us")
        benchmark_rules()
        benchmark_scan(work, python)
        benchmark_signatures(work)
        benchmark_signed_pulls(work)
        if not args.no_dockerd:
            benchmark_dockerd(work, processes, load, args, compare, start, stop)
    finally:
        stop_processes(processes)
        for leftover in Path("/run/docker/plugins").glob("dip-bench-*.sock"):   # the Go peer leaves its socket
            leftover.unlink()
        shutil.rmtree(work, ignore_errors=True)
    return 0


CPU_DMA_LATENCY = "/dev/cpu_dma_latency"


@contextlib.contextmanager
def cpus_kept_awake() -> Iterator[None]:
    """No CPU enters an idle state while this lasts: a PM QoS request of 0 µs exit latency.

    One connection's calls come one after another, so the plugin's thread
    sleeps between them and its CPU halts; on a virtual machine each wake-up
    then finds caches and the CPU's state cold. The Go runtime spins a while
    before it sleeps, which keeps its CPU out of that state under load; this
    shows what the plugin does when its CPU is treated the same way.
    """
    descriptor = os.open(CPU_DMA_LATENCY, os.O_WRONLY)
    try:
        os.write(descriptor, (0).to_bytes(4, sys.byteorder))   # the kernel keeps it while the file is open
        yield
    finally:
        os.close(descriptor)


# Worker processes on one plugin socket, measured beside one process: as many as the machine has cores.
BENCHMARK_WORKERS = 2


def serve_forked_workers(config: str, socket_path: str, workers: int) -> None:
    """The plugin socket served by several processes, for the benchmark only (issue 20).

    The policy is loaded and the socket bound once, then the process forks
    into workers, each serving connections as the plugin's server does. The
    parent accepts every connection and hands it to the next worker in turn
    (over a unix socket pair, SCM_RIGHTS): workers that accepted on the
    socket themselves shared four connections unevenly, often all to one of
    them, with poll() as serve_forever waits and with a blocking accept()
    alike. Each worker remembers, logs and counts on its own, and nothing
    reloads: this is the most worker processes could gain, before the cost of
    one log writer, metrics summed across workers and a reload that every
    worker takes or none. SIGTERM stops the workers and releases the socket.
    """
    stopping = {signal.SIGTERM, signal.SIGINT}
    signal.pthread_sigmask(signal.SIG_BLOCK, stopping)
    log = dip.Log("info")
    server = dip.PluginServer(socket_path, dip.Plugin(config, dip.load_tested_policy, log, dip.DockerAPI(dip.DEFAULT_DOCKER_HOST)))
    children, handoffs = [], []
    for _ in range(workers):
        parent_end, child_end = socket.socketpair()
        pid = os.fork()
        if pid == 0:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, stopping)
            server.socket.close()
            log.buffer(dip.LOG_FLUSH_INTERVAL)
            while True:
                _, (descriptor,), _, _ = socket.recv_fds(child_end, 1, 1)
                server.process_request(socket.socket(fileno=descriptor), "")
        child_end.close()
        children.append(pid)
        handoffs.append(parent_end)

    def hand_out() -> None:
        for turn in itertools.count():
            connection, _ = server.socket.accept()
            socket.send_fds(handoffs[turn % workers], [b"c"], [connection.fileno()])
            connection.close()
    threading.Thread(target=hand_out, daemon=True).start()
    signal.sigwait(stopping)
    for pid in children:
        os.kill(pid, signal.SIGTERM)
        os.waitpid(pid, 0)
    server.server_close()


def process_cpu_seconds(pid: int) -> list[float]:
    """User and system CPU time of a process and of each of its children, as they run now."""
    seconds = []
    for each in [pid, *map(int, Path(f"/proc/{pid}/task/{pid}/children").read_text().split())]:
        fields = Path(f"/proc/{each}/stat").read_text().rpartition(")")[2].split()
        seconds.append((int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK"))
    return seconds


def benchmark_workers(work: Path, python: str, load: str, args: Any, start: Any, stop: Any) -> None:
    """The four-connection rows with one plugin process, with BENCHMARK_WORKERS forked ones, and with the Go peer:
    rate, latency and CPU time per request (of every process of each side), alternating rounds, medians; and
    how the workers shared the connections, as the smallest share of the workers' CPU time in each round."""
    import statistics
    kinds = {"one process": "python", f"{BENCHMARK_WORKERS} processes": "workers", "Go peer": "go"}
    sockets = {title: work / f"{kind}-workers.sock" for title, kind in kinds.items()}
    servers = {title: start(kind, ORIGINAL_CONFIG, sockets[title]) for title, kind in kinds.items()}
    print("plugin socket, 4 connections: rps p50us p99us, CPU us per request, for " + ", ".join(kinds)
          + "; rate vs one process, vs Go")
    for title, flags in [("mixed", ()), ("mixed, all distinct", ("-unique",))]:
        runs: dict[str, list[dict[str, float]]] = {kind: [] for kind in kinds}
        shares = []
        for _ in range(args.rounds):
            for kind in kinds:
                before = process_cpu_seconds(servers[kind].pid)
                output = subprocess.run([load, "-socket", str(sockets[kind]), "-d", f"{args.duration}s", "-c", "4",
                                         *flags], capture_output=True, text=True, check=True).stdout
                spent = [after - earlier for after, earlier in zip(process_cpu_seconds(servers[kind].pid), before)]
                run = {k: float(v) for k, v in re.findall(r"(\w+)=([\d.]+)", output)}
                run["cpu_us"] = sum(spent) / run["requests"] * 1e6
                runs[kind].append(run)
                if kinds[kind] == "workers":
                    shares.append(min(spent[1:]) / max(sum(spent[1:]), 1e-9))
        medians = [{key: statistics.median(run[key] for run in kind_runs) for key in ("rps", "p50_us", "p99_us", "cpu_us")}
                   for kind_runs in runs.values()]
        one, workers, go = medians
        print(f"  {title:<22}" + "".join(f" {m['rps']:>7.0f} {m['p50_us']:>5.0f} {m['p99_us']:>5.0f} {m['cpu_us']:>4.0f} |"
                                       for m in medians)
              + f" {workers['rps'] / one['rps']:.2f}x, {one['rps'] / go['rps']:.2f}x -> {workers['rps'] / go['rps']:.2f}x")
        print(f"  {'':<22} least busy worker's share of the workers' CPU time, by round: "
              + " ".join(f"{share:.0%}" for share in shares))
    for process in servers.values():
        stop(process)


def signature_routes(digest: str, payload: bytes, key_file: Path) -> dict[str, tuple[int, dict[str, str], bytes]]:
    """A registry's answers for a cosign 2 signature of bench/app's digest: its .sig manifest and payload."""
    payload_digest = "sha256:" + hashlib.sha256(payload).hexdigest()
    signature = base64.b64encode(signed_by(key_file, payload)).decode()
    manifest = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                           "config": {}, "layers": [{
                               "mediaType": "application/vnd.dev.cosign.simplesigning.v1+json",
                               "digest": payload_digest, "size": len(payload),
                               "annotations": {dip.COSIGN_SIGNATURE_ANNOTATION: signature}}]}).encode()
    return {f"/v2/bench/app/manifests/{digest.replace(':', '-')}.sig":
            (200, {"Content-Type": "application/vnd.oci.image.manifest.v1+json"}, manifest),
            f"/v2/bench/app/blobs/{payload_digest}": (200, {}, payload)}


def anonymous_registry(routes: dict[str, tuple[int, dict[str, str], bytes]]) -> dip.ThreadingHTTPServer:
    """A stand-in registry on a free loopback port answering GET from routes, with no token flow."""
    class Registry(StandInRegistryHandler):
        def do_GET(self) -> None:
            status, headers, body = routes.get(self.path, (404, {}, b"{}"))
            self.send_response(status)
            for name, value in {"Content-Length": str(len(body)), **headers}.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(body)

    server = dip.ThreadingHTTPServer(("127.0.0.1", 0), Registry)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def benchmark_signatures(work: Path) -> None:
    """A cosign signature check: the ECDSA verification, a first check through a loopback registry, a remembered one."""
    import statistics
    key_file = work / "signing.key"
    openssl("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", str(key_file))
    key = dip.public_key_from_pem(openssl("ec", "-in", str(key_file), "-pubout").decode(), str(key_file))
    digest = DIGEST
    payload = json.dumps({"critical": {"identity": {"docker-reference": "bench/app"},
                                       "image": {"docker-manifest-digest": digest},
                                       "type": "cosign container image signature"}, "optional": None}).encode()
    signature = signed_by(key_file, payload)
    server = anonymous_registry(signature_routes(digest, payload, key_file))
    try:
        reference = parse_reference(f"127.0.0.1:{server.server_address[1]}/bench/app@{digest}")

        def timed(action: Any, count: int) -> float:
            times = []
            for _ in range(count):
                started = time.perf_counter()
                action()
                times.append(time.perf_counter() - started)
            return statistics.median(times) * 1000

        ecdsa = timed(lambda: key.verify(payload, signature), 100)
        client = dip.RegistryClient()
        verdict = dip.verify_image(client, reference, (key,))   # HTTPS refused, then plain HTTP, remembered
        assert verdict.ok, verdict

        def first_check() -> None:   # a digest not yet remembered, from a registry already known
            client.verdicts = dip.VerdictMemory()
            dip.verify_image(client, reference, (key,))
        first = timed(first_check, 20)
        remembered = timed(lambda: dip.verify_image(client, reference, (key,)), 1000)
        print(f"cosign signature check (ms): ECDSA P-256 verification {ecdsa:.2f}, first check through a loopback"
              f" registry {first:.2f}, remembered {remembered:.4f}")
    finally:
        server.shutdown()
        server.server_close()


# Rules on which Python's re takes seconds to hours (issues 16 and 21): the
# nested repetition --validate used to warn about, and several wildcards.
STALLING_RULES = list(dict.fromkeys(["^([a-z0-9]+[._-]?)*:1\\.", ".*/.*/.*/.*:latest$", ".*/.*/.*/.*/.*:latest$",
                                     *(rule for rule in TestPolicy.EXPONENTIAL if "(?!" not in rule)]))


def crafted_names() -> list[dip.Reference]:
    """The longest valid names made of one repeated piece, with the longest tag or a short one."""
    names = []
    for piece in ("a", "a/", "a-", "a.", "0.", "a_", "a__"):
        for tag in (":1", ":" + "a" * 127 + "1", "@" + DIGEST):
            for count in range(260, 0, -1):
                with contextlib.suppress(InvalidReference):
                    names.append(parse_reference((piece * count).strip("/._-") + "b" + tag))
                    break
    return names


def benchmark_rules() -> None:
    """One decision, as the daemon makes it, with one rule on crafted names of the longest valid length."""
    names = crafted_names()
    longest = max(len(name.canonical) for name in names)
    print(f"rules Python's re could take long on, one decision on {len(names)} crafted names"
          f" (up to {longest} characters); worst:")
    for pattern in STALLING_RULES:
        times: dict[str, list[float]] = {"first": [], "again": []}
        for name in names:
            policy = policy_of({"blacklist": [pattern], "defaultAllow": True})   # nothing remembered
            samples = []
            for _ in range(4):
                started = time.perf_counter()
                policy.evaluate(name)
                samples.append(time.perf_counter() - started)
            times["first"].append(samples[0])
            times["again"].append(min(samples[1:]))
        engine = "linear" if isinstance(getattr(policy.blacklist.rules[0].search, "__self__", None),
                                        dip.LinearMatcher) else "re"
        print(f"  {pattern:<44} {engine:<6} first {max(times['first']) * 1e3:5.2f} ms"
              f"   again {max(times['again']) * 1e3:5.2f} ms")


def benchmark_scan(work: Path, python: str, count: int = 1000) -> float:
    """--scan of a stand-in daemon holding count images and count containers, as a process; seconds."""
    digests = [hashlib.sha256(b"%d" % i).hexdigest() for i in range(count)]   # IDs spread as real ones are
    images = [{"Id": f"sha256:{digests[i]}", "RepoTags": [f"{'nginx' if i % 4 else 'redis'}:1.{i}"],
               "RepoDigests": [f"{'nginx' if i % 4 else 'redis'}@sha256:{digests[i]}"]} for i in range(count)]
    # Containers by name, by image ID and by short ID, as dockerd lists them.
    containers = [{"Id": f"{i:064x}", "Names": [f"/c{i}"], "ImageID": images[i]["Id"],
                   "Image": [images[i]["RepoTags"][0], images[i]["Id"], images[i]["Id"][7:19]][i % 3]}
                  for i in range(count)]
    answers = {"/images/json?all=1": json.dumps(images).encode(), "/containers/json?all=1": json.dumps(containers).encode()}

    class ManyImages(StandInDockerHandler):
        def do_GET(self) -> None:
            body = answers.get(self.path, b'{"message": "This node is not a swarm manager."}')
            self.send_response(200 if self.path in answers else 503)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    socket_path = str(work / "scan.sock")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(socket_path)
    server = socketserver.ThreadingUnixStreamServer(socket_path, ManyImages)
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    config = work / "scan.json"
    config.write_text(json.dumps(ORIGINAL_CONFIG))
    try:
        started = time.perf_counter()
        result = subprocess.run([python, str(MODULE), "--config", str(config), "--scan", "--docker-host",
                                 f"unix://{socket_path}", "--format", "json"], capture_output=True, text=True)
        seconds = time.perf_counter() - started
    finally:
        server.shutdown()
        server.server_close()
    refused = len(json.loads(result.stdout)["refused"])
    print(f"--scan of {count:,} images and {count:,} containers (a stand-in daemon), whole process: {seconds:.2f} s,"
          f" {refused} refused")
    return seconds


def benchmark_signed_pulls(work: Path) -> None:
    """The plugin's decision on a pull in a signed scope (first and remembered verification, by digest and by tag),
    and on a pull in another scope, beside the same pull under a policy without signedBy."""
    import statistics
    key_file = work / "release.key"
    openssl("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", str(key_file))
    (work / "release.pub").write_bytes(openssl("ec", "-in", str(key_file), "-pubout"))
    image = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                        "config": {"digest": DIGEST}, "layers": []}).encode()
    digest = "sha256:" + hashlib.sha256(image).hexdigest()
    payload = json.dumps({"critical": {"identity": {"docker-reference": "bench/app"},
                                       "image": {"docker-manifest-digest": digest},
                                       "type": "cosign container image signature"}, "optional": None}).encode()
    server = anonymous_registry({**signature_routes(digest, payload, key_file),
                                 "/v2/bench/app/manifests/v1": (200, {}, image),
                                 f"/v2/bench/app/manifests/{digest}": (200, {}, image)})
    try:
        host = f"127.0.0.1:{server.server_address[1]}"
        scopes = [{"allow": "docker.io"}, {"allow": f"{host}/bench", "signedBy": [str(work / "release.pub")]}]
        plugins = {}
        for name, entries in (("signed", scopes), ("unsigned", scopes[:1])):
            (work / f"{name}.json").write_text(json.dumps({"scopes": entries}))
            plugins[name] = dip.Plugin(str(work / f"{name}.json"), dip.load_tested_policy,
                                       dip.Log("error", io.StringIO()),
                                       dip.DockerAPI("unix:///nonexistent"), signatures=dip.RegistrySignatures(None))

        def body(image: str) -> bytes:
            return json.dumps(pull(f"/v1.41/images/create?fromImage={quote(image, safe='')}")).encode()

        def timed(plugin: dip.Plugin, request: bytes, count: int, forget: bool = False) -> float:
            times = []
            for _ in range(count):
                if forget:   # a digest not yet remembered, from a registry already known
                    plugin.signatures.daemon()[0].verdicts = dip.VerdictMemory()   # type: ignore[attr-defined]
                started = time.perf_counter()
                decision, _ = plugin.decide(plugin.policy, request)
                times.append(time.perf_counter() - started)
                assert decision.allow and decision.rule != "internal-error", decision
            return statistics.median(times) * 1e6

        by_digest, by_tag, other = body(f"{host}/bench/app@{digest}"), body(f"{host}/bench/app:v1"), body("nginx:1")
        timed(plugins["signed"], by_digest, 1)   # HTTPS refused, then plain HTTP: remembered per host
        print(f"signed pull decision (us): by digest first {timed(plugins['signed'], by_digest, 20, True):.0f},"
              f" remembered {timed(plugins['signed'], by_digest, 1000):.0f}; by tag first"
              f" {timed(plugins['signed'], by_tag, 20, True):.0f}, remembered {timed(plugins['signed'], by_tag, 200):.0f}"
              " (the tag is resolved at every pull)")
        def mean(plugin: dip.Plugin, request: bytes, count: int = 20000) -> float:
            started = time.perf_counter()
            for _ in range(count):
                plugin.decide(plugin.policy, request)
            return (time.perf_counter() - started) / count * 1e6
        rounds = [(mean(plugins["signed"], other), mean(plugins["unsigned"], other)) for _ in range(3)]
        print(f"pull in an unsigned scope, not remembered (us): policy with signedBy elsewhere"
              f" {statistics.median(r[0] for r in rounds):.1f}, policy without"
              f" {statistics.median(r[1] for r in rounds):.1f}")
    finally:
        server.shutdown()
        server.server_close()


def benchmark_dockerd(work: Path, processes: list, load: str, args: Any, compare: Any, start: Any, stop: Any) -> None:
    """GET /containers/json through a real dockerd, configured with each plugin in turn."""
    dockerd = shutil.which("dockerd") or "/usr/sbin/dockerd"
    plugins = {kind: Path(f"/run/docker/plugins/dip-bench-{kind}.sock") for kind in ("python", "workers", "go")}
    daemons = {}
    for kind, plugin_socket in plugins.items():
        start(kind, ORIGINAL_CONFIG, plugin_socket)
        root = work / kind
        docker_socket = root / "docker.sock"
        root.mkdir()
        process = subprocess.Popen([dockerd, "--storage-driver=vfs", "--iptables=false", "--ip-masq=false",
                                    "--bridge=none", "--data-root", str(root / "data"), "--exec-root", str(root / "exec"),
                                    "--pidfile", str(root / "pid"), "-H", f"unix://{docker_socket}",
                                    f"--authorization-plugin={plugin_socket.stem}"],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        processes.append(process)
        wait_for(lambda: subprocess.run(["docker", "-H", f"unix://{docker_socket}", "version"],
                                        capture_output=True).returncode == 0, "dockerd", timeout=60)
        daemons[kind] = (process, docker_socket, root)
    for connections in (1, 4):
        compare(f"through dockerd, GET /containers/json, {connections} client(s)", daemons["python"][1],
                daemons["go"][1], "-get", "/v1.41/containers/json", "-c", str(connections))
    compare(f"through dockerd, {BENCHMARK_WORKERS} worker processes, 4 clients", daemons["workers"][1],
            daemons["go"][1], "-get", "/v1.41/containers/json", "-c", "4")
    for process, _, root in daemons.values():
        stop(process)
        subprocess.run(["umount", "-R", str(root / "exec")], capture_output=True)
        subprocess.run(["umount", "-R", str(root / "data")], capture_output=True)


if __name__ == "__main__":
    if sys.argv[1:2] == ["benchmark"]:
        sys.exit(benchmark(sys.argv[2:]))
    if sys.argv[1:2] == ["forked-workers"]:
        serve_forked_workers(sys.argv[2], sys.argv[3], int(sys.argv[4]))
        sys.exit(0)
    unittest.main()
