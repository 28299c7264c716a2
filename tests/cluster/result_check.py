#!/usr/bin/env python3
"""Checks a program's closing `RESULT {json}` line against expected values.

usage: result_check.py <output-file> <key>=<json-value>...

The output's last non-empty line must be `RESULT {json}`; each key must be present with exactly the
given value (parsed as JSON: 4, "passed", true, [0,0,1,1]). Prints one line per mismatch and exits 1,
or prints the line and exits 0.
"""
import json
import sys


def main(argv):
    if len(argv) < 2:
        print(__doc__.strip().splitlines()[2], file=sys.stderr)
        return 2
    with open(argv[1], encoding="utf-8", errors="replace") as f:
        lines = [line.strip() for line in f if line.strip()]
    if not lines or not lines[-1].startswith("RESULT "):
        print(f"result_check: {argv[1]}: the output does not end with a RESULT line", file=sys.stderr)
        return 1
    try:
        result = json.loads(lines[-1][len("RESULT "):])
    except json.JSONDecodeError as e:
        print(f"result_check: {argv[1]}: the RESULT line is not JSON ({e})", file=sys.stderr)
        return 1
    failures = []
    for expectation in argv[2:]:
        key, _, text = expectation.partition("=")
        expected = json.loads(text)
        if key not in result:
            failures.append(f"{key}: missing, expected {text}")
        elif result[key] != expected:
            failures.append(f"{key}: got {json.dumps(result[key])}, expected {text}")
    for failure in failures:
        print(f"result_check: {argv[1]}: {failure}", file=sys.stderr)
    if failures:
        print(lines[-1], file=sys.stderr)
        return 1
    print(lines[-1])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
