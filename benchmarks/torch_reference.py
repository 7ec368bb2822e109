"""PyTorch reference models for the benchmarks, run in a process of their own.

PyTorch is a reference only, never a dependency of dlsuite (`pip install -e
".[bench]"` installs torch==2.13.0). It runs in a worker process, not beside
TensorFlow: both keep thread pools that spin for a while after their work
(TensorFlow's Eigen pool, PyTorch's OpenMP threads), so in one process each
side's spinning threads would take the cores from the other side's next
repeat. The parent sends one request per line on the worker's stdin and reads
one JSON answer per line, timed inside the worker, so
`common.interleaved` still alternates the two sides repeat by repeat.

    worker = TorchWorker.start()            # None, with a message, where torch is missing
    worker.setup("train", cell="lstm", units=512, layers=2, vocab_size=97, tokens=x, targets=y)
    items, seconds = worker.run(steps=1)
"""

import contextlib
import importlib.util
import json
import subprocess
import sys
import time

EMBEDDING_DIM = 64


def available():
    """Whether torch can be imported, found without importing it."""
    return importlib.util.find_spec("torch") is not None


class TorchWorker:
    """The parent's handle on a worker process holding one PyTorch model."""

    def __init__(self, process):
        self._process = process
        self.info = self._request({"op": "info"})
        self.cpu_seconds = []  # the worker's CPU time of each run, warm-ups included

    @classmethod
    def start(cls, *, who="benchmark"):
        """A running worker, or None (with a message on stderr) where torch is not installed."""
        if not available():
            print(f"{who}: PyTorch is not installed, skipping the PyTorch rows "
                  "(pip install -e \".[bench]\" installs torch==2.13.0).", file=sys.stderr, flush=True)
            return None
        process = subprocess.Popen([sys.executable, "-m", "benchmarks.torch_reference"],
                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        return cls(process)

    def _request(self, request):
        self._process.stdin.write(json.dumps(request) + "\n")
        self._process.stdin.flush()
        line = self._process.stdout.readline()
        if not line:
            raise RuntimeError(f"the PyTorch worker exited (status {self._process.wait()}); see its stderr above")
        answer = json.loads(line)
        if "error" in answer:
            raise RuntimeError(f"the PyTorch worker failed: {answer['error']}")
        return answer

    def setup(self, task, **arguments):
        """Builds the worker's model for `task` ("train" or "generate")."""
        return self._request({"op": "setup", "task": task, **arguments})

    def run(self, **arguments):
        """One timed repeat in the worker: (items, seconds), as `common.interleaved` takes them."""
        answer = self._request({"op": "run", **arguments})
        self.cpu_seconds.append(answer["cpu_seconds"])
        return answer["items"], answer["seconds"]

    def close(self):
        self._process.stdin.close()
        self._process.wait(timeout=60)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# --- Inside the worker -------------------------------------------------------

def _language_model(torch, cell, *, units, layers, vocab_size):
    """Embedding(V, 64) -> nn.LSTM / nn.GRU(units) x layers -> Linear(V): the app's model in PyTorch."""

    class LanguageModel(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embedding = torch.nn.Embedding(vocab_size, EMBEDDING_DIM)
            recurrent = torch.nn.LSTM if cell == "lstm" else torch.nn.GRU
            self.rnn = recurrent(EMBEDDING_DIM, units, num_layers=layers, batch_first=True)
            self.predictions = torch.nn.Linear(units, vocab_size)

        def forward(self, tokens, state=None):  # tokens (batch, time)
            x, state = self.rnn(self.embedding(tokens), state)  # (batch, time, units)
            return self.predictions(x), state  # (batch, time, vocab)

    torch.manual_seed(0)
    return LanguageModel()


def _trainer(torch, *, cell, units, layers, vocab_size, tokens, targets, lr=0.003, clipnorm=5.0):
    """Adam, gradients clipped to a global norm of 5, cross-entropy on every step: the Keras side's
    recipe; each run's `precision` "bfloat16" runs the forward pass under CPU autocast."""
    model = _language_model(torch, cell, units=units, layers=layers, vocab_size=vocab_size).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    x = torch.tensor(tokens, dtype=torch.int64)  # (batch, time)
    y = torch.tensor(targets, dtype=torch.int64)

    def run(steps, precision="float32"):
        for _ in range(steps):
            optimizer.zero_grad()
            with _precision(torch, precision):
                logits, _ = model(x)
            loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, vocab_size), y.reshape(-1))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), clipnorm)
            optimizer.step()
        loss.item()
        return steps * x.numel()

    return run


def _sampler(torch, *, cell, units, layers, vocab_size, start_id, temperature=0.8, seed=1):
    """PyTorch's usual stateful sampling loop: one token in, the state carried, softmax / T, multinomial."""
    model = _language_model(torch, cell, units=units, layers=layers, vocab_size=vocab_size).eval()

    def run(length):
        generator = torch.Generator().manual_seed(seed)
        with torch.inference_mode():
            token, state = torch.tensor([[start_id]]), None
            for _ in range(length):
                logits, state = model(token, state)  # (1, 1, V)
                probabilities = torch.softmax(logits[0, -1] / temperature, dim=-1)
                token = torch.multinomial(probabilities, 1, generator=generator)[None]  # (1, 1)
        return length

    return run


def _resnet50(torch, classes):
    """ResNet-50 as keras.applications builds it (v1: the stride on each stage's first 1x1)."""
    nn = torch.nn

    def conv_bn(inputs, outputs, kernel, stride=1, relu=True):
        layers = [nn.Conv2d(inputs, outputs, kernel, stride, padding=kernel // 2, bias=False),
                  nn.BatchNorm2d(outputs, eps=1.001e-5)]
        return nn.Sequential(*layers, nn.ReLU(inplace=True)) if relu else nn.Sequential(*layers)

    class Bottleneck(nn.Module):
        def __init__(self, inputs, filters, stride):
            super().__init__()
            self.residual = nn.Sequential(conv_bn(inputs, filters, 1, stride), conv_bn(filters, filters, 3),
                                          conv_bn(filters, 4 * filters, 1, relu=False))
            self.shortcut = (conv_bn(inputs, 4 * filters, 1, stride, relu=False)
                             if stride != 1 or inputs != 4 * filters else nn.Identity())

        def forward(self, x):
            return torch.relu(self.residual(x) + self.shortcut(x))

    blocks, inputs = [], 64
    for stage, (filters, count) in enumerate(((64, 3), (128, 4), (256, 6), (512, 3))):
        for index in range(count):
            blocks.append(Bottleneck(inputs, filters, 2 if index == 0 and stage > 0 else 1))
            inputs = 4 * filters
    return nn.Sequential(conv_bn(3, 64, 7, 2), nn.MaxPool2d(3, 2, padding=1), *blocks,
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2048, classes))


def _vgg16(torch, classes, image_size):
    """VGG-16 as keras.applications builds it with its top: 13 3x3 convolutions, 4096, 4096, classes."""
    nn = torch.nn
    layers, inputs = [], 3
    for filters, count in ((64, 2), (128, 2), (256, 3), (512, 3), (512, 3)):
        for _ in range(count):
            layers += [nn.Conv2d(inputs, filters, 3, padding=1), nn.ReLU(inplace=True)]
            inputs = filters
        layers.append(nn.MaxPool2d(2))
    side = image_size // 32
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(512 * side * side, 4096), nn.ReLU(inplace=True),
                         nn.Linear(4096, 4096), nn.ReLU(inplace=True), nn.Linear(4096, classes))


CNNS = {"resnet50": lambda torch, classes, size: _resnet50(torch, classes), "vgg16": _vgg16}


def _precision(torch, precision):
    """The context a step runs in: float32 as it is, or CPU autocast to bfloat16."""
    if precision == "bfloat16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    if precision != "float32":
        raise ValueError(f"precision must be float32 or bfloat16, not {precision!r}")
    return contextlib.nullcontext()


def _cnn(torch, *, model, image_size, batch, classes, seed=0):
    """The CNN in channels_last (oneDNN's fast layout on CPU) and a fixed batch of synthetic images."""
    torch.manual_seed(seed)
    network = CNNS[model](torch, classes, image_size).to(memory_format=torch.channels_last)
    images = torch.rand(batch, 3, image_size, image_size).contiguous(memory_format=torch.channels_last)
    return network, images


def _cnn_trainer(torch, *, model, image_size, batch, classes, lr=0.01, momentum=0.9):
    """SGD with momentum 0.9 and cross-entropy, as the Keras side trains (train_throughput)."""
    network, images = _cnn(torch, model=model, image_size=image_size, batch=batch, classes=classes)
    network.train()
    labels = torch.randint(0, classes, (batch,))
    optimizer = torch.optim.SGD(network.parameters(), lr=lr, momentum=momentum)

    def run(steps, precision="float32"):
        for _ in range(steps):
            optimizer.zero_grad()
            with _precision(torch, precision):
                logits = network(images)
            loss = torch.nn.functional.cross_entropy(logits.float(), labels)
            loss.backward()
            optimizer.step()
        loss.item()
        return steps * batch

    return run


def _cnn_predictor(torch, *, model, image_size, batch, classes):
    """Inference of one batch: eval mode, no autograd, softmax of the logits."""
    network, images = _cnn(torch, model=model, image_size=image_size, batch=batch, classes=classes)
    network.eval()

    def run(calls, precision="float32"):
        with torch.inference_mode(), _precision(torch, precision):
            for _ in range(calls):
                probabilities = torch.softmax(network(images).float(), dim=-1)
        probabilities.sum().item()
        return calls * batch

    return run


RUNNERS = {"train": _trainer, "generate": _sampler, "train_cnn": _cnn_trainer, "predict_cnn": _cnn_predictor}


def serve():
    """The worker's loop: one JSON request per stdin line, one JSON answer per stdout line."""
    import torch

    runner = None
    for line in sys.stdin:
        request = json.loads(line)
        op = request.pop("op")
        try:
            if op == "info":
                answer = {"torch": torch.__version__, "torch_threads": torch.get_num_threads()}
            elif op == "setup":
                task = request.pop("task")
                runner = RUNNERS[task](torch, **request)
                answer = {"ok": True}
            else:
                start, cpu_start = time.perf_counter(), time.process_time()
                items = runner(**request)
                answer = {"items": items, "seconds": time.perf_counter() - start,
                          "cpu_seconds": time.process_time() - cpu_start}
        except Exception as error:  # sent back: the parent raises it with its message
            answer = {"error": f"{type(error).__name__}: {error}"}
        print(json.dumps(answer), flush=True)


if __name__ == "__main__":
    serve()
