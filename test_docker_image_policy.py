"""Tests for docker_image_policy, in the module's section order.

    python3 -m unittest -v test_docker_image_policy

The end-to-end classes start a real registry and real dockerd engines (20.10
from the machine; 26.1 from Debian trixie; 28.5 from Debian sid, with the
classic and with the containerd image store) and drive them with two docker
CLIs (the machine's 20.10 and sid's 28.5). They need root, dockerd,
docker-registry, busybox and the machine's Debian archive (engines and CLI are
downloaded once), and skip with a message when something is missing, unless
DOCKER_IMAGE_POLICY_REQUIRE_E2E=1 (set by CI) makes that a failure.
DOCKER_IMAGE_POLICY_LONG=1 runs the fuzz and soak tests at ten times the size.

    python3 test_docker_image_policy.py benchmark

measures the plugin against the Go peer (see README.md, Performance).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import functools
import http.client
import io
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
import threading
import time
import unittest
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest import mock
from urllib.parse import quote

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
            "Quay.IO/calico/node:v3": "quay.io/calico/node:v3",
        }
        for text, canonical in table.items():
            with self.subTest(text):
                self.assertEqual(parse_reference(text).canonical, canonical)

    def test_familiar_forms(self):
        table = {
            "docker.io/library/nginx:1.25": "nginx:1.25",
            "someone/app:2": "someone/app:2",
            "quay.io/calico/node:v3": "quay.io/calico/node:v3",
            "nginx": "nginx:latest",
            f"nginx@{DIGEST}": f"nginx@{DIGEST}",
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
        for text in ["a." * 127 + "io/x:1", "a." * 100000 + "io/x:1", "x" * 300, "nginx:" + "1" * 10**6]:
            with self.subTest(len(text)), self.assertRaisesRegex(InvalidReference, "longer than"):
                parse_reference(text)

    def test_invalid_references(self):
        for text in ["Ubuntu", "foo..bar", "alpine:", "a:b:c", "a" * 64, "", "nginx@sha256:abc",
                     "nginx@md5:" + "a" * 32, "a/" + "b" * 255, "nginx:" + "t" * 129, "-nginx", "ngin x"]:
            with self.subTest(text), self.assertRaises(InvalidReference):
                parse_reference(text)

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
                self.assertFalse(dip.compile_rule("test.json", "blacklist", 0, pattern).canonical)

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
                key: False for key, _ in dip.OPAQUE_OPERATIONS.values()}})
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
        self.assertFalse(policy.allows_operation("load").allow)
        self.assertTrue(policy_of(dict(ORIGINAL_CONFIG, defaultAllow=True)).allows_operation("build").allow)
        self.assertFalse(policy_of({"defaultAllow": True, "allowBuild": False}).allows_operation("build").allow)

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
                         ' "defaultallow" (did you mean "defaultAllow"?); unknown key "colour" (known keys: whitelist,'
                         ' blacklist, defaultAllow, mode, checkRun, allowBuild, allowCommit, allowImport, allowLoad,'
                         ' allowPluginCreate, allowSwarm, message, tests)')
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
        self.assertEqual(self.config_error('{\n"mode": "audit",\n"whitelist": [],\n"mode": "enforce"}'),
                         '/etc/docker/p.json: line 4: duplicate key "mode"')
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
        for trial in range(20):
            config = {"whitelist": [pattern() for _ in range(rng.randint(0, 200))],
                      "blacklist": [pattern() for _ in range(rng.randint(0, 200))],
                      "defaultAllow": rng.random() < 0.5}
            policy = policy_of(config)
            for ref in references:
                expected = None
                for kind in ("whitelist", "blacklist"):
                    for index, text in enumerate(config[kind]):
                        # Rules that name docker.io see canonical forms too (test_rules_that_name_docker_hub).
                        forms = ref.forms(False) + (ref.forms(True) if re.search(r"docker\W*io", text, re.I) else ())
                        if expected is None and any(re.search(text, form) for form in forms):
                            expected = (kind == "whitelist", f"{kind}[{index}] {json.dumps(text)}")
                expected = expected or (config["defaultAllow"], "defaultAllow")
                verdict = policy.evaluate(ref)
                self.assertEqual((verdict.allow, verdict.rule), expected, (trial, ref.canonical))

    def test_indexed_lookup_under_the_services_interpreter(self):
        # The systemd unit runs /usr/bin/python3, whose re._parser gives the prefixes the index trusts.
        system = "/usr/bin/python3"
        if not os.path.exists(system) or os.path.realpath(system) == os.path.realpath(sys.executable):
            self.skipTest(f"{system} is missing or is the interpreter running these tests")
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
        self.assertEqual([(test.index, test.operation, test.allow) for test in policy.tests],
                         [(0, "pull", True), (1, "pull-all-tags", True), (2, "tag", False), (3, "load", False)])
        self.assertEqual(policy.configuration()["tests"], [
            {"image": "nginx:1.25", "expect": "allow"},
            {"image": "nginx", "operation": "pull-all-tags", "expect": "allow", "note": "every tag"},
            {"image": "nginx:1", "operation": "tag", "target": "redis:7", "expect": "deny"},
            {"operation": "load", "expect": "deny"}])
        self.assertEqual(policy_of(ORIGINAL_CONFIG).tests, ())
        operations = ", ".join(dip.CLIENT_REQUESTS)
        for tests, error in [
            ({"image": "x"}, '"tests": must be a list of objects, not {"image": "x"}'),
            ([["nginx"]], '"tests"[0]: must be an object such as {"image": "nginx:1.25", "expect": "allow"},'
                          ' not ["nginx"]'),
            ([{"image": "nginx", "expect": "allow", "expected": "deny"}],
             '"tests"[0]: unknown key "expected" (known keys: image, operation, target, expect, note)'),
            ([{"image": "nginx", "expect": "allow"}, {"image": "nginx", "expect": "yes"}],
             '"tests"[1]: "expect" must be "allow" or "deny", not "yes"'),
            ([{"image": "nginx"}], '"tests"[0]: "expect" must be "allow" or "deny", not null'),
            ([{"image": 7, "expect": "deny"}], '"tests"[0]: "image" must be a string, not 7'),
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
        # "my_registry.example.com" has a dot, so it is read as a registry, but "_" is
        # not allowed in a host name: such a name is judged (here: denied), never an error.
        for request in [pull("/v1.41/images/create?fromImage=my_registry.example.com/app&tag=1"),
                        authz("POST", "/v1.41/containers/create", {"Image": "my_registry.example.com/app:1"})]:
            with self.subTest(request["RequestUri"]):
                decision = self.decide(request)
                self.assertEqual(decision.allow, False)
                self.assertIn(decision.rule, ("unreadable", "defaultAllow"))

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
                    self.assertEqual((decision.allow, decision.operation), (allowed, operation))
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
        self.assertDecision(pull("/v1.41/images/redis%3A7/tag?repo=nginx&tag=1"), False, "tag of redis:7 denied")
        self.assertDecision(pull("/v1.41/images/%zz/create?fromImage=redis"), False, "invalid %-escape")
        self.assertDecision(pull("relative/images/create?fromImage=redis"), False, "neither a path")

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
                self.assertEqual((decision.allow, decision.operation), (allow, operation), decision)
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
                             (b'{"HostConfig": {"Mounts": {}}}', "where an array belongs"),
                             (b"[" * 5000, "nested too deeply"),
                             # dockerd reads the first value (engines before 25) or rejects the rest.
                             (b'{"Image":"redis:7"} {"Image":"nginx:1"}', "run of redis:7 denied")]:
            with self.subTest(body):
                self.assertDecision(authz("POST", "/v1.41/containers/create", body), False, reason)

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
        self.assertEqual((tag.allow, tag.operation), (False, "tag"))

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
        ]:
            with self.subTest(uri):
                self.assertDecision(authz("POST", uri, service("nginx:1")), allow, reason, docker=docker)
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
        if images == tuple(answer["images"]):
            source = kind if kind == "run" else f"service {answer['from']}"
            return f"{source}: images" + (" with image mounts" if len(images) > 1 else "")
        return "ambiguous" if unreadable and "ambiguous" in str(images) else None
    if "empty" in answer:   # dockerd refuses it; the image is "" either way
        return "run: empty config" if unreadable or images == tuple(answer["empty"]) else None
    if "spec" in answer:
        return f"{kind}: spec error" if unreadable else None
    first = answer.get("first", {})
    if "images" in first or "empty" in first:   # older engines read the first value and ignore the rest
        expected = tuple(first.get("images", first.get("empty")))
        return "trailing data" if unreadable or images == expected else None
    if unreadable:
        return f"{kind}: decode error, refused"
    if isinstance(images, tuple) and all(isinstance(image, str) for image in images):
        return f"{kind}: decode error, read anyway"
    return None


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
# HTTP handlers and servers
# --------------------------------------------------------------------------

class PluginFixture:
    """A plugin with both listeners on a temporary socket and port."""

    def __init__(self, config: dict[str, Any], log_level: str = "info") -> None:
        self.dir = tempfile.mkdtemp(prefix="dip")
        self.config_path = os.path.join(self.dir, "policy.json")
        self.write_config(config)
        self.log = io.StringIO()
        self.plugin = dip.Plugin(self.config_path, dip.Log(log_level, self.log), dip.DockerAPI("unix:///nonexistent"))
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
            (b"", not_an_object), (b"{", not_an_object), (b"null", not_an_object), (b"[]", not_an_object),
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
        self.assertEqual([json.loads(line)["rule"] for line in lines], ["unreadable"] * 11)   # no internal error

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
            **ORIGINAL_CONFIG, "mode": "enforce", "checkRun": True, "allowBuild": False, "allowCommit": False,
            "allowImport": False, "allowLoad": False, "allowPluginCreate": False, "allowSwarm": False,
            "message": "", "tests": []})
        self.assertTrue(body.startswith('{\n    "whitelist": [\n        "^nginx:",'), body)
        status = json.loads(self.fixture.get("/status?pretty=1")[1])
        digest = hashlib.sha256(Path(self.fixture.config_path).read_bytes()).hexdigest()
        self.assertEqual(status["policy"], {"file": self.fixture.config_path, "sha256": digest,
                                            "rules": {"whitelist": 3, "blacklist": 1}})
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
    return dip.Decision(False, "pull", f"docker.io/library/redis:{number}", f"redis:{number}", "defaultAllow",
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
        self.assertIn('docker_image_policy_reloads_total{outcome="success"} 2', metrics)
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

    def test_decision_log_has_no_secrets_and_skips_benign_calls(self):
        secret_body = {"Image": "nginx:1", "Env": ["PASSWORD=hunter2"]}
        self.ask(authz("POST", "/v1.41/containers/create", secret_body, User="alice", RequestHeaders={
            "Content-Type": "application/json", "X-Registry-Auth": "c2VjcmV0"}))
        self.ask(authz("GET", "/v1.41/containers/json"))
        lines = [json.loads(line) for line in self.fixture.log.getvalue().splitlines()]
        self.assertEqual(len(lines), 1)
        self.assertEqual(set(lines[0]), {"time", "operation", "image", "decision", "rule", "reason", "mode", "user",
                                         "policy"})
        self.assertEqual(lines[0]["policy"], self.fixture.plugin.policy.sha256[:12])
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
                     "# TYPE docker_image_policy_last_reload_success_timestamp_seconds gauge"]:
            self.assertIn(line + "\n", body)
        for name in re.findall(r"^# TYPE (\S+)", body, re.M):
            self.assertIn(f"# HELP {name} ", body)

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
            # One more is more than it keeps: it forgets everything and starts again.
            self.assertEqual(answer(pulls[-1])["Msg"], denied.format(dip.CACHE_ENTRIES))
            self.assertEqual(list(memory), [pulls[-1]])
            self.assertEqual(answer(pulls[0])["Msg"], denied.format(0))
            self.assertEqual((decide.call_count, len(memory)), (dip.CACHE_ENTRIES + 2, 2))
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
        pulls_asked = 2 * dip.CACHE_ENTRIES + 2 + 4
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
        # An event is written at once, after the decision lines still waiting.
        log.decision(decision_number(1000), "deny", ENFORCE)
        log.event("info", "reloaded")
        *_, waiting, event = stream.getvalue().splitlines()
        self.assertEqual((json.loads(waiting)["image"], event),
                         ("docker.io/library/redis:1000", "docker-image-policy: info: reloaded"))

    def test_stalled_stderr_blocks_no_decision_and_drops_beyond_the_bound(self):
        stream = Stream()
        log, flusher = buffered_log(self, stream, 0.01)
        stream.open.clear()   # journald stops reading
        log.decision(decision_number(0), "deny", ENFORCE)
        self.assertTrue(stream.entered.wait(10))   # the flush thread is stuck writing it
        extra = 7

        def decide() -> None:
            for number in range(1, dip.MAX_PENDING_LINES + extra + 1):
                log.decision(decision_number(number), "deny", ENFORCE)
        deciding = threading.Thread(target=decide)
        deciding.start()
        deciding.join(20)
        self.assertFalse(deciding.is_alive(), "decisions waited for a stalled stderr")
        self.assertEqual(stream.writes, [])
        stream.open.set()
        warning = f"docker-image-policy: warning: {extra} decision lines dropped while stderr did not keep up"
        wait_for(lambda: stream.getvalue().endswith(warning + "\n"), "the dropped-lines warning")
        lines = stream.getvalue().splitlines()
        self.assertEqual(len(lines), 1 + dip.MAX_PENDING_LINES + 1)
        self.assertEqual([json.loads(line)["image"] for line in (lines[0], lines[1], lines[-2])],
                         [f"docker.io/library/redis:{n}" for n in (0, 1, dip.MAX_PENDING_LINES)])
        self.assertEqual({thread for thread, _ in stream.writes}, {flusher})

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
        self.assertEqual(document["refused"][4], {"kind": "service", "id": "s2", "name": "miner",
                                                  "operation": "service", "image": "docker.io/evil/miner:1",
                                                  "rule": "defaultAllow", "reason": NO_RULE})
        clean = TestDockerAPI.stand_in(self, {
            "/images/json?all=1": (200, [{"Id": NGINX_ID, "RepoTags": ["nginx:1.25"], "RepoDigests": []}]),
            "/containers/json?all=1": (200, []), "/services": (503, {"message": "This node is not a swarm manager."})})
        result = run_module("--config", self.fixture.config_path, "--scan", "--docker-host", clean.host)
        self.assertEqual((result.returncode, result.stdout), (0, "0 refused of 1 judged: 1 images, 0 containers,"
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
            f"10 decisions replayed under {candidate}: 7 would change (5 allow -> deny, 2 deny -> allow) on 5 images,"
            " 1 unchanged; not decided again: 1 a request that could not be read, 1 an image ID resolved at the"
            " time; 1 other lines"])
        self.assertEqual(run_module("--config", self.fixture.config_path, "--replay", str(log)).stdout.splitlines(),
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
                                               "otherLines": 1})
        result = run_module("--config", str(candidate), "--replay", str(log) + ".missing")
        self.assertEqual(result.returncode, 2)
        self.assertIn("cannot read the decision log: [Errno 2] No such file or directory", result.stderr)

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


        self.fixture.write_config({"whitelist": ["^quay\\.io/", "nginx"], "blacklist": ["^quay\\.io/bad"]})
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

    def test_validate_strict_fails_on_any_warning(self):
        config = self.fixture.config_path
        self.fixture.write_config({"whitelist": ["^nginx", "^registry.example.com/"], "blacklist": [":latest$"]})
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
        self.fixture.write_config({"whitelist": ["^nginx:[^/]*$", "^registry\\.example\\.com/"]})
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
        plugin = dip.Plugin(self.fixture.config_path, dip.Log("info", stream), dip.DockerAPI("unix:///nonexistent"))
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
        with socket.socket() as taken:   # an admin address another process listens on
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            address = f"127.0.0.1:{taken.getsockname()[1]}"
            sock = os.path.join(directory, "d.sock")
            result = run_module("--config", self.fixture.config_path, "--socket", sock, "--addr", address)
        self.assertEqual((result.returncode, result.stderr), (1, f"docker-image-policy: error: cannot listen on"
                                                                f" {address}: [Errno 98] Address already in use\n"))
        self.assertFalse(os.path.lexists(sock))   # the plugin socket it had bound is gone

    def test_command_line_errors(self):
        config = self.fixture.config_path
        for argv, message in [
            (["--check", "nginx", "--validate"], "--check and --validate cannot be combined"),
            (["--scan", "--replay", "-"], "--scan and --replay cannot be combined"),
            (["--scan", "--operation", "run"], "--operation and --tag-target go with --check"),
            (["--check", "nginx", "--operation", "tag"], "--tag-target NAME goes with --operation tag, and"
                                                         " --operation tag needs it"),
            (["--check", "nginx", "--tag-target", "x"], "--tag-target NAME goes with --operation tag, and"
                                                        " --operation tag needs it"),
            (["--validate", "--format", "json"], "--format goes with --check, --scan or --replay"),
            (["--strict"], "--strict is valid only with --validate"),
            (["--check", "nginx", "--strict"], "--strict is valid only with --validate"),
            (["--addr", "5006"], "--addr: expected HOST:PORT, not '5006'"),
            (["--addr", "127.0.0.1:http"], "--addr: expected HOST:PORT, not '127.0.0.1:http'"),
            (["--docker-host", "ssh://docker"], "--docker-host: expected unix://PATH or tcp://HOST:PORT,"
                                                " not 'ssh://docker'"),
            (["--docker-host", "/var/run/docker.sock"], "--docker-host: expected unix://PATH or tcp://HOST:PORT,"
                                                        " not '/var/run/docker.sock'"),
            (["--colour"], "unrecognized arguments: --colour"),
            (["--addr", "127.0.0.1:99999"], "--addr: port 99999 is out of range (0 to 65535; 0 picks a free one)"),
            (["--log-decisions", "some"], "argument --log-decisions: invalid choice: 'some' (choose from 'all',"
                                          " 'denies', 'none')"),
        ]:
            with self.subTest(argv), mock.patch.object(dip, "serve", side_effect=AssertionError("serve() called")), \
                    contextlib.redirect_stderr(io.StringIO()) as stderr, self.assertRaises(SystemExit) as caught:
                dip.main(["--config", config, *argv])
            self.assertEqual(caught.exception.code, 2)
            self.assertEqual(stderr.getvalue().splitlines()[-1], f"docker-image-policy: error: {message}")
        result = run_module("--config", config, "--addr", "nowhere")   # and as a process
        self.assertEqual(result.returncode, 2)
        self.assertTrue(result.stderr.startswith("usage: docker-image-policy "), result.stderr)
        self.assertTrue(result.stderr.endswith("docker-image-policy: error: --addr: expected HOST:PORT,"
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
                     "PrivateTmp=yes", "PrivateDevices=yes", "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6"]:
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

        def reload() -> int:
            for command in commands:
                command = [{"/usr/bin/python3": sys.executable, "/usr/local/bin/docker_image_policy.py": str(MODULE),
                            "/etc/docker/docker-image-policy.json": self.fixture.config_path,
                            "$MAINPID": str(process.pid)}.get(word, word) for word in command]
                status = subprocess.run(command, capture_output=True, timeout=60).returncode
                if status:
                    return status
            return 0

        def reloads() -> int:
            return stderr_path.read_text().count("reloaded")
        self.fixture.write_config({"whitelist": ["^redis:("]})
        self.assertEqual(reload(), 2)   # systemctl reload fails; the daemon never got SIGHUP
        time.sleep(0.5)
        self.assertEqual(reloads(), 0)
        self.fixture.write_config({"whitelist": ["^redis:"]})
        self.assertEqual(reload(), 0)
        wait_for(lambda: reloads() == 1, "the reload")

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
            log.decision(dip.Decision(False, "pull", "docker.io/library/redis:7", "redis:7"), "deny", ENFORCE)
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

    def test_example_config_is_valid(self):
        path = str(HERE / "docker-image-policy.json")
        result = run_module("--config", path, "--validate", "--strict")
        self.assertEqual((result.returncode, result.stderr), (0, ""))
        self.assertEqual(result.stdout, f"{path}: all 8 tests pass\n"   # the tests the file carries
                                        f"{path}: valid, 3 whitelist and 0 blacklist rules, mode enforce\n")
        # Approved nginx, docker and calico images, by tag or digest; never :latest, nor a look-alike.
        policy = dip.load_policy(path)
        for image, allow in [("nginx:1.25", True), (f"nginx@{DIGEST}", True), ("docker:24-dind", True),
                             ("quay.io/calico/node:v3.27.0", True), (f"quay.io/calico/node@{DIGEST}", True),
                             ("nginx", False), ("nginx:latest", False), ("docker:latest", False),
                             ("quay.io/calico/node", False), ("redis:7", False), ("nginx:5000/evil/miner:1", False),
                             ("nginxevil/miner:1", False), ("quay.io/calico/node-evil:v3", False)]:
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
        with fixture.connect() as sock:
            for number in range(6_000 * self.scale):
                if number == 3_000 * self.scale:
                    fixture.write_config(dict(NAME_POLICY, defaultAllow=True))
                    self.assertTrue(fixture.plugin.reload())
                policy = fixture.plugin.policy
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
                verdict = policy.evaluate(reference)
                kind = verdict.rule.split("[")[0] + (" allows" if verdict.allow else " denies")
                verdicts[kind] = verdicts.get(kind, 0) + 1
                expected = "" if verdict.allow else f"{operation} of {reference.familiar} denied: {verdict.reason}"
                self.assertEqual((answer["Allow"], answer["Msg"]), (verdict.allow, expected), request)
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
    def start_plugin(cls) -> None:
        cls.admin_port = free_port()
        cls.plugin = cls.spawn([sys.executable, str(MODULE), "--config", str(cls.config), "--socket",
                                str(cls.plugin_socket), "--addr", f"127.0.0.1:{cls.admin_port}",
                                "--docker-host", f"unix://{cls.docker_socket}"], "plugin.log")
        wait_for(lambda: cls.admin_get("/health") == "HEALTHY", "the plugin")

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
        cls.dockerd_process = cls.spawn(
            [cls.dockerd, *cls.storage, "--iptables=false", "--ip-masq=false", "--bridge=none",
             "--data-root", str(cls.dir / "data"), "--exec-root", str(cls.dir / "exec"),
             "--pidfile", str(cls.dir / "docker.pid"), "-H", f"unix://{cls.docker_socket}",
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

    def test_reload_of_dockerd_loads_the_plugin_and_keeps_containers(self):
        # The README's rollout: name the plugin in daemon.json, then systemctl reload docker (SIGHUP).
        allowed, denied = f"{self.registry}/allowed/busybox:1", f"{self.registry}/denied/busybox:1"
        self.docker_ok("pull", allowed)
        container = self.docker_ok("run", "--detach", "--network", "none", allowed, "busybox", "sleep", "600")
        self.addCleanup(self.docker, CLIS[0], "rm", "--force", container)
        self.addCleanup(self.remove, denied)

        def reload_dockerd(plugins: list[str]) -> None:
            self.daemon_json.write_text(json.dumps({"authorization-plugins": plugins}))
            with open(self.dir / "dockerd.log") as log:
                log.seek(0, os.SEEK_END)
                self.dockerd_process.send_signal(signal.SIGHUP)
                wait_for(lambda: "Reloaded configuration" in log.read(), "dockerd's reload")
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

    def test_zz_restart_plugin_under_running_dockerd(self):
        cls = type(self)
        cls.plugin.kill()   # leaves its socket behind, as a crash would
        cls.plugin.wait()
        self.assertTrue(cls.plugin_socket.exists())
        image = f"{self.registry}/denied/busybox:1"
        results: dict[str, subprocess.CompletedProcess] = {}
        calls = [threading.Thread(target=lambda: results.update(pull=self.docker(CLIS[0], "pull", image))),
                 threading.Thread(target=lambda: results.update(ps=self.docker(CLIS[-1], "ps")))]
        for call in calls:
            call.start()
        time.sleep(3)
        self.assertEqual(results, {})   # dockerd holds the calls while the plugin is gone
        cls.start_plugin()              # over the stale socket
        cls.apply_policy(self.test_policy)
        for call in calls:
            call.join(120)
        self.assertNotEqual(results["pull"].returncode, 0)
        self.assertFalse(self.image_present(image))
        self.assertEqual(self.docker(CLIS[0], "ps").returncode, 0)
        self.assertEqual(self.docker(CLIS[-1], "pull", f"{self.registry}/allowed/busybox:1").returncode, 0)


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
        for connections in (1, 4):
            compare(f"plugin socket, mixed load, {connections} connection(s)", sockets["python"], sockets["go"],
                    "-c", str(connections))
        # Every pull and create with its own tag: nothing can be answered from memory.
        compare("plugin socket, mixed, all distinct, 1 conn", sockets["python"], sockets["go"], "-c", "1", "-unique")
        for process in mixed.values():
            stop(process)
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
        benchmark_rules()
        benchmark_scan(work, python)
        if not args.no_dockerd:
            benchmark_dockerd(work, processes, load, args, compare, start, stop)
    finally:
        stop_processes(processes)
        for leftover in Path("/run/docker/plugins").glob("dip-bench-*.sock"):   # the Go peer leaves its socket
            leftover.unlink()
        shutil.rmtree(work, ignore_errors=True)
    return 0


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


def benchmark_dockerd(work: Path, processes: list, load: str, args: Any, compare: Any, start: Any, stop: Any) -> None:
    """GET /containers/json through a real dockerd, configured with each plugin in turn."""
    dockerd = shutil.which("dockerd") or "/usr/sbin/dockerd"
    plugins = {kind: Path(f"/run/docker/plugins/dip-bench-{kind}.sock") for kind in ("python", "go")}
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
    for process, _, root in daemons.values():
        stop(process)
        subprocess.run(["umount", "-R", str(root / "exec")], capture_output=True)
        subprocess.run(["umount", "-R", str(root / "data")], capture_output=True)


if __name__ == "__main__":
    if sys.argv[1:2] == ["benchmark"]:
        sys.exit(benchmark(sys.argv[2:]))
    unittest.main()
