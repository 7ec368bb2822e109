"""Prometheus metrics of `dlsuite serve`, at GET /monitoring/prometheus/metrics (TensorFlow Serving's path).

Written and exposed by `prometheus_client`, each server with its own
`CollectorRegistry`, so several servers in one process (tests) count apart:

==============================================  =========  ===============================================
dlsuite_serve_requests_total                    counter    by model_name, version, api, status, code, protocol
dlsuite_serve_request_latency_seconds           histogram  by model_name, api, protocol: every request, any status
dlsuite_serve_version_loaded                    gauge      1 per loaded (model_name, version)
dlsuite_serve_batch_size                        histogram  by model_name: rows of each batch run, padding in
dlsuite_serve_batch_requests                    histogram  by model_name: requests joined in each batch run
==============================================  =========  ===============================================

The two batch histograms fill with `--enable-batching` (`batching.py`), as
TensorFlow Serving's `:tensorflow:serving:batching_session:processed_batch_size`
(the size run, padding included) and the number of tasks in a batch.

`api` is predict, classify, regress, metadata or status; `status` the
canonical error code name TensorFlow Serving's `status` label carries (OK,
INVALID_ARGUMENT, NOT_FOUND, ...), `code` the HTTP status (REST) or the gRPC
status code's number (gRPC: 0 OK, 3 INVALID_ARGUMENT, 5 NOT_FOUND, ...), and
`protocol` "rest" or "grpc" (`grpc_server.py`). `version` is the
version that answered (a request without one gets the highest), empty where
none did (an unknown model or version, a status request for every version).
A model name the server does not serve is counted as model_name="", so a
client sending made-up names cannot grow the series without bound.

Why not TensorFlow Serving's own names (`:tensorflow:serving:request_count`
{model_name, status}, `:tensorflow:serving:request_latency` {model_name, API,
entrypoint}, `tensorflow_serving/servables/tensorflow/util.cc`): those mean
something else (its latency is in microseconds and counts successful
requests only; its count has no version or API), `prometheus_client` writes
a counter as NAME_total, so its exact series could not come out anyway, and
Prometheus keeps names with colons for recording rules. The labels
`model_name` and `status` are TensorFlow Serving's, so a query for one
carries over by changing the metric name (docs/serving.md has the table).
"""

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import choose_encoder

from dlsuite.apps.serve.errors import HTTP_STATUS

PATH = "/monitoring/prometheus/metrics"
APIS = ("predict", "classify", "regress", "metadata", "status")
# 0.1 ms to 105 s, doubling: a LeNet-5 request takes 3 ms here, a language model sampling 2,000 characters
# tens of seconds. (TensorFlow Serving's: 10 us times 1.8**i, 33 buckets.)
LATENCY_BUCKETS = tuple(0.0001 * 2 ** i for i in range(21))
# 1, 2, 4, ... 1024: TensorFlow Serving's max_batch_size defaults to 1000.
BATCH_BUCKETS = tuple(2.0 ** i for i in range(11))
# HTTP statuses the server answers without a canonical code of its own.
_STATUS_NAMES = {200: "OK", 413: "RESOURCE_EXHAUSTED"}
_NAMES_BY_HTTP = {}
for _name, _http in HTTP_STATUS.items():
    _NAMES_BY_HTTP.setdefault(_http, _name)


class Metrics:
    """The counters of one server and the page that shows them.

    Args:
        repository: the server's `repository.Repository`; its loaded
            versions are read at each scrape.
    """

    def __init__(self, repository):
        self._repository = repository
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "dlsuite_serve_requests",
            "Requests to /v1/models and to the gRPC API, by model, the version that answered, API, status and "
            "protocol.",
            ["model_name", "version", "api", "status", "code", "protocol"], registry=self.registry)
        self.latency = Histogram(
            "dlsuite_serve_request_latency_seconds",
            "Wall time from the request's arrival to its answer, every status, by model, API and protocol.",
            ["model_name", "api", "protocol"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.batch_size = Histogram(
            "dlsuite_serve_batch_size",
            "Rows of each batch run with --enable-batching, padding to an allowed batch size included, by model.",
            ["model_name"], buckets=BATCH_BUCKETS, registry=self.registry)
        self.batch_requests = Histogram(
            "dlsuite_serve_batch_requests",
            "Requests joined in each batch run with --enable-batching, by model.",
            ["model_name"], buckets=BATCH_BUCKETS, registry=self.registry)
        self.registry.register(_LoadedVersions(repository))

    def record_batch(self, model, rows, requests):
        """Counts one batch run (`batching.Batcher`'s observe): its rows, padding in, and its requests."""
        self.batch_size.labels(model_name=model).observe(rows)
        self.batch_requests.labels(model_name=model).observe(requests)

    def record(self, *, model, version, api, code, status_name=None, seconds, protocol="rest"):
        """Counts one answered request.

        Args:
            model: the model name in the URL or the gRPC request's model_spec.
            version: the version that answered, or None.
            api: one of APIS.
            code: the HTTP status sent (REST) or the gRPC status code's
                number (gRPC).
            status_name: the canonical code name of its error, if known;
                else derived from `code` as an HTTP status (REST only).
            seconds: how long it took.
            protocol: "rest" or "grpc".
        """
        model = model if model in self._repository.names() else ""
        status_name = status_name or _STATUS_NAMES.get(code) or _NAMES_BY_HTTP.get(code, "UNKNOWN")
        self.requests.labels(model_name=model, version="" if version is None else str(version), api=api,
                             status=status_name, code=str(code), protocol=protocol).inc()
        self.latency.labels(model_name=model, api=api, protocol=protocol).observe(seconds)

    def exposition(self, accept=None):
        """(body bytes, content type) for a scrape whose Accept header is `accept`: the text format
        (version 0.0.4), or OpenMetrics where the scraper asks for it, as prometheus_client chooses."""
        encoder, content_type = choose_encoder(accept)
        return encoder(self.registry), content_type

    def request_totals(self):
        """{model name: requests answered so far, any API and status}, from the counter (for the page)."""
        totals = {}
        for family in self.requests.collect():
            for sample in family.samples:
                if sample.name.endswith("_total") and sample.labels["model_name"]:
                    name = sample.labels["model_name"]
                    totals[name] = totals.get(name, 0) + int(sample.value)
        return totals


class _LoadedVersions:
    """dlsuite_serve_version_loaded, read from the repository at each scrape (no bookkeeping on load)."""

    def __init__(self, repository):
        self._repository = repository

    def describe(self):
        return [GaugeMetricFamily("dlsuite_serve_version_loaded", "1 for each model version being served.",
                                  labels=["model_name", "version"])]

    def collect(self):
        family = self.describe()[0]
        for name, numbers in sorted(self._repository.loaded().items()):
            for number in numbers:
                family.add_metric([name, str(number)], 1)
        yield family
