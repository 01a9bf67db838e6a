#!/usr/bin/env python3
"""Parses a /metrics body from stdin with the Python Prometheus client's own parsers and prints
its families as JSON: [{"name", "type", "unit", "help", "samples": [{"name", "labels"}]}].

Usage: parse_metrics.py openmetrics|prometheus. A body the parser refuses exits 1 with the
parser's error on stderr."""

import json
import sys

from prometheus_client.openmetrics.parser import text_string_to_metric_families as openmetrics
from prometheus_client.parser import text_string_to_metric_families as prometheus

parse = {"openmetrics": openmetrics, "prometheus": prometheus}[sys.argv[1]]
try:
    families = [
        {
            "name": f.name,
            "type": f.type,
            "unit": f.unit,
            "help": f.documentation,
            "samples": [{"name": s.name, "labels": s.labels, "value": s.value} for s in f.samples],
        }
        for f in parse(sys.stdin.read())
    ]
except Exception as e:  # the parser's verdict is the test's failure report
    print(f"{type(e).__name__}: {e}", file=sys.stderr)
    sys.exit(1)
json.dump(families, sys.stdout)
