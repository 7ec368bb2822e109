"""LSTM and GRU layers with a fast CPU training path and Keras's own numbers.

`FusedLSTM` and `FusedGRU` are `keras.layers.LSTM` and `keras.layers.GRU`
(same weights, same config, same cell, so `layer.cell(x, states)` still steps
them one token at a time) with one change: on a machine where TensorFlow sees
no GPU, and for the cuDNN-compatible configuration (tanh, sigmoid, bias, no
recurrent dropout, no mask, no unroll, GRU reset_after), the sequence runs
through a loop written for the CPU instead of Keras's generic one. On a GPU
the layers call Keras's `inner_loop`, which picks the cuDNN kernel.

Why (issue 17, ../shared/notes/recurrent-speed.md): Keras's generic loop
computes `x_t @ W` at every step and autodiff accumulates dW and dU step by
step, 0.71x PyTorch's nn.LSTM for a 2x512 char model on 2 cores. Here the
forward pass computes the input projection X @ W for all time steps in one
matmul, the loop does only `h @ U` and the gate arithmetic, and a hand-written
backward pass (`tf.custom_gradient`) runs a reverse loop doing only `dz @ U^T`
and element-wise work, then takes the weight gradients as single large
matmuls over all time x batch rows (dU = H_prev^T dZ; dW, db, dX from the
one projection). `tf.raw_ops.BlockLSTMV2` is not used: its registered
gradient assumes the V1 gate order and comes out wrong, and it runs Eigen
matmuls (0.45x Keras here). A batch runs as two loops side by side
(`_split_batch`): one loop's small per-step matmuls left a core idle. With
TensorFlow's intra-op threads as `dlsuite lm` sets them (`intra_op_threads`:
one on 2 cores), measured in one run, interleaved (`python -m benchmarks
--only lm_speed --part training`, 2 cores, batch 64 x 100), against PyTorch
2.13 / plain Keras: LSTM 2x512 1.13 / 1.31, GRU 2x512 1.53 / 1.28, LSTM 1x256
1.05 / 1.34, GRU 1x256 1.43 / 1.27. XLA (`jit_compile` on the loops or on the whole step) was slower
here; moving the backward loop's gate factors out of the loop was no faster, and
one sigmoid over all four gates (tanh(x) = 2 sigmoid(2x) - 1) 2 to 3% slower,
XLA on the gate arithmetic alone and one TensorArray for all that the forward
loop keeps (fewer loop variables) no faster.

The math is Keras's: gates (i, f, c, o) for the LSTM, (z, r, h) with the
reset gate after the recurrent matmul for the GRU; tests/test_fused_rnn.py
checks outputs and gradients against the stock layers on the same weights.

Under mixed_bfloat16 (issue 28) the matmuls run in bfloat16 and the state,
the gate arithmetic and the gradients carried back through time in float32
(`_matmul`; the LSTM's h, which only matmuls and the output read, stays in
bfloat16, `_lstm_sequence`); Keras's own layer keeps all of it in bfloat16. 2x512 LSTM and
GRU training on a 2-core AMD EPYC with AVX512-BF16, `python -m benchmarks
--only bfloat16 --part rnn`: docs/scaling.md.
"""

import os

import keras
import tensorflow as tf


def _no_gpu():
    return not tf.config.list_logical_devices("GPU")


def _state_dtype(compute_dtype):
    """The dtype the loops keep the state, the gates and their gradients in."""
    return "float32" if compute_dtype in ("bfloat16", "float16") else compute_dtype


def _matmul(a, b, **kwargs):
    """a @ b computed in b's dtype, returned in a's.

    Under mixed_bfloat16 the weights come in bfloat16 and the state, the gates
    and their gradients stay float32: the matmuls are where bfloat16 pays
    (oneDNN runs them natively, accumulating in float32), while the cell
    state carried over a hundred steps, and the gradient carried back over
    them, would lose a bit at every step in bfloat16's 8-bit mantissa. In
    float32 both casts are no-ops.
    """
    return tf.cast(tf.matmul(tf.cast(a, b.dtype), b, **kwargs), a.dtype)


# ---------------------------------------------------------------------------
# LSTM: z_t = x_t W + b + h_{t-1} U, gates (i, f, g, o) = (σ, σ, tanh, σ)(z_t),
# c_t = f c_{t-1} + i g, h_t = o tanh(c_t). Tensors are time-major inside.
# ---------------------------------------------------------------------------

@tf.function(autograph=False)
def _lstm_forward(xw, h0, c0, recurrent_kernel):
    """The forward loop over precomputed x_t W + b.

    Args:
        xw: (time, batch, 4 units) input projections x_t W + b, in the kernels'
            dtype, as the recurrent matmul's result they are added to.
        h0: (batch, units) initial h, in the kernels' dtype: h is only ever
            read by the next step's matmul and by the layer's output, both in
            that dtype, so the loop carries and keeps it so.
        c0: (batch, units) initial c, in the state dtype, as the gates.
        recurrent_kernel: (units, 4 units).

    Returns:
        hs: (time, batch, units) every step's h (the kernel's dtype); cs: every
        step's c; gates: (time, batch, 4 units) the activated gates (i, f, g, o),
        kept for the backward pass (the state dtype).
    """
    steps = tf.shape(xw)[0]

    def body(t, h, c, hs, cs, gates):
        z = tf.cast(xw[t] + tf.matmul(h, recurrent_kernel), c.dtype)  # (batch, 4 units)
        i, f, g, o = tf.split(z, 4, axis=1)
        i, f, g, o = tf.sigmoid(i), tf.sigmoid(f), tf.tanh(g), tf.sigmoid(o)
        c = f * c + i * g
        h = tf.cast(o * tf.tanh(c), h.dtype)
        return (t + 1, h, c, hs.write(t, h), cs.write(t, c), gates.write(t, tf.concat([i, f, g, o], axis=1)))

    array = lambda dtype: tf.TensorArray(dtype, size=steps, element_shape=h0.shape)
    _, _, _, hs, cs, gates = tf.while_loop(
        lambda t, *_: t < steps, body,
        (0, h0, c0, array(h0.dtype), array(c0.dtype),
         tf.TensorArray(c0.dtype, size=steps, element_shape=tf.TensorShape([h0.shape[0], None]))),
        parallel_iterations=1,
    )
    return hs.stack(), cs.stack(), gates.stack()


@tf.function(autograph=False)
def _lstm_backward(dhs, dh_last, dc_last, c0, cs, gates, recurrent_kernel):
    """The reverse loop: dZ for every step (in the kernel's dtype, as the weight
    gradients' matmuls take it) and the gradients of h0, c0."""
    steps = tf.shape(dhs)[0]
    recurrent_t = tf.transpose(recurrent_kernel)  # (4 units, units)
    c_prev_all = tf.concat([c0[None], cs[:-1]], axis=0)  # (time, batch, units)

    def body(t, dh_next, dc_next, dzs):
        i, f, g, o = tf.split(gates[t], 4, axis=1)
        tanh_c = tf.tanh(cs[t])
        dh = dhs[t] + dh_next
        dc = dc_next + dh * o * (1.0 - tanh_c * tanh_c)
        dz = tf.cast(tf.concat([
            dc * g * i * (1.0 - i),
            dc * c_prev_all[t] * f * (1.0 - f),
            dc * i * (1.0 - g * g),
            dh * tanh_c * o * (1.0 - o),
        ], axis=1), recurrent_t.dtype)  # (batch, 4 units)
        return t - 1, tf.cast(tf.matmul(dz, recurrent_t), dh.dtype), dc * f, dzs.write(t, dz)

    _, dh0, dc0, dzs = tf.while_loop(
        lambda t, *_: t >= 0, body,
        (steps - 1, dh_last, dc_last,
         tf.TensorArray(recurrent_kernel.dtype, size=steps, element_shape=gates.shape[1:])),
        parallel_iterations=1,
    )
    return dzs.stack(), dh0, dc0


def _lstm_sequence(x, h0, c0, kernel, recurrent_kernel, bias):
    """(batch, time, features) -> hs (batch, time, units), h_T, c_T; with its gradient.

    x, the states and the kernels in the layer's compute dtype, the bias in
    `_state_dtype`'s, which the loops keep the cell state, the gates and the
    gradients carried back in (see `_matmul`). Under mixed_bfloat16 the
    pre-activations x_t W + b + h_{t-1} U come from bfloat16 matmuls and are
    summed there, h is carried in bfloat16 and dZ is kept in it, as the matmuls
    that read them take them: one cast less per step and half the memory
    traffic for those arrays (2x512 layers' training step 1.03-1.05x faster).
    """

    @tf.custom_gradient
    def run(x, h0, c0, kernel, recurrent_kernel, bias):
        batch, steps, features = tf.shape(x)[0], tf.shape(x)[1], tf.shape(x)[2]
        units4 = tf.shape(kernel)[1]
        x_tm = tf.transpose(x, [1, 0, 2])  # (time, batch, features)
        x_rows = tf.reshape(x_tm, [-1, features])  # (time * batch, features)
        xw = tf.reshape(tf.matmul(x_rows, kernel) + tf.cast(bias, kernel.dtype), [steps, batch, units4])
        c0_ = tf.cast(c0, bias.dtype)
        hs, cs, gates = _lstm_forward(xw, h0, c0_, recurrent_kernel)

        def grad(d_out, d_h_last, d_c_last):
            d_out = tf.zeros_like(cs) if d_out is None else tf.cast(tf.transpose(d_out, [1, 0, 2]), cs.dtype)
            d_h_last = tf.zeros_like(c0_) if d_h_last is None else tf.cast(d_h_last, cs.dtype)
            d_c_last = tf.zeros_like(c0_) if d_c_last is None else tf.cast(d_c_last, cs.dtype)
            dzs, dh0, dc0 = _lstm_backward(d_out, d_h_last, d_c_last, c0_, cs, gates, recurrent_kernel)
            dz_rows = tf.reshape(dzs, [-1, units4])  # (time * batch, 4 units), the kernels' dtype
            h_prev = tf.reshape(tf.concat([h0[None], hs[:-1]], axis=0), [-1, tf.shape(h0)[1]])
            d_kernel = tf.matmul(x_rows, dz_rows, transpose_a=True)
            d_recurrent = tf.matmul(h_prev, dz_rows, transpose_a=True)
            d_bias = tf.reduce_sum(tf.cast(dz_rows, bias.dtype), axis=0)
            dx = tf.transpose(tf.reshape(tf.matmul(dz_rows, kernel, transpose_b=True), [steps, batch, features]),
                              [1, 0, 2])
            return dx, tf.cast(dh0, h0.dtype), tf.cast(dc0, c0.dtype), d_kernel, d_recurrent, d_bias

        outputs = tf.cast(tf.transpose(hs, [1, 0, 2]), x.dtype)
        return (outputs, tf.cast(hs[-1], x.dtype), tf.cast(cs[-1], x.dtype)), grad

    return run(x, h0, c0, kernel, recurrent_kernel, bias)


# ---------------------------------------------------------------------------
# GRU (reset_after): a_t = x_t W + b_in, r_t = h_{t-1} U + b_rec, split (z, r, h);
# z = σ(a_z + r_z), r = σ(a_r + r_r), n = tanh(a_h + r * r_h),
# h_t = z h_{t-1} + (1 - z) n.
# ---------------------------------------------------------------------------

@tf.function(autograph=False)
def _gru_forward(xw, h0, recurrent_kernel, recurrent_bias):
    """Returns hs (time, batch, units) and saved (time, batch, 4 units): z, r, n, r_h."""
    steps = tf.shape(xw)[0]

    def body(t, h, hs, saved):
        inner = _matmul(h, recurrent_kernel) + recurrent_bias  # (batch, 3 units)
        x_z, x_r, x_h = tf.split(xw[t], 3, axis=1)
        r_z, r_r, r_h = tf.split(inner, 3, axis=1)
        z = tf.sigmoid(x_z + r_z)
        r = tf.sigmoid(x_r + r_r)
        n = tf.tanh(x_h + r * r_h)
        h = z * h + (1.0 - z) * n
        return t + 1, h, hs.write(t, h), saved.write(t, tf.concat([z, r, n, r_h], axis=1))

    _, _, hs, saved = tf.while_loop(
        lambda t, *_: t < steps, body,
        (0, h0, tf.TensorArray(xw.dtype, size=steps, element_shape=h0.shape),
         tf.TensorArray(xw.dtype, size=steps, element_shape=tf.TensorShape([h0.shape[0], None]))),
        parallel_iterations=1,
    )
    return hs.stack(), saved.stack()


@tf.function(autograph=False)
def _gru_backward(dhs, dh_last, h0, hs, saved, recurrent_kernel):
    """Returns d(x W + b_in) and d(h U + b_rec), each (time, batch, 3 units), and dh0."""
    steps = tf.shape(dhs)[0]
    recurrent_t = tf.transpose(recurrent_kernel)  # (3 units, units)
    h_prev_all = tf.concat([h0[None], hs[:-1]], axis=0)

    def body(t, dh_next, d_xs, d_inners):
        z, r, n, r_h = tf.split(saved[t], 4, axis=1)
        dh = dhs[t] + dh_next
        d_a_h = dh * (1.0 - z) * (1.0 - n * n)
        d_a_z = dh * (h_prev_all[t] - n) * z * (1.0 - z)
        d_a_r = d_a_h * r_h * r * (1.0 - r)
        d_inner = tf.concat([d_a_z, d_a_r, d_a_h * r], axis=1)
        d_x = tf.concat([d_a_z, d_a_r, d_a_h], axis=1)
        dh_prev = _matmul(d_inner, recurrent_t) + dh * z
        return t - 1, dh_prev, d_xs.write(t, d_x), d_inners.write(t, d_inner)

    shape = tf.TensorShape([dhs.shape[1], None])
    _, dh0, d_xs, d_inners = tf.while_loop(
        lambda t, *_: t >= 0, body,
        (steps - 1, dh_last, tf.TensorArray(dhs.dtype, size=steps, element_shape=shape),
         tf.TensorArray(dhs.dtype, size=steps, element_shape=shape)),
        parallel_iterations=1,
    )
    return d_xs.stack(), d_inners.stack(), dh0


def _gru_sequence(x, h0, kernel, recurrent_kernel, bias):
    """(batch, time, features) -> hs (batch, time, units), h_T; with its gradient.

    Dtypes as in `_lstm_sequence`: the loops keep the bias's.
    """

    @tf.custom_gradient
    def run(x, h0, kernel, recurrent_kernel, bias):
        batch, steps, features = tf.shape(x)[0], tf.shape(x)[1], tf.shape(x)[2]
        units3 = tf.shape(kernel)[1]
        x_rows = tf.reshape(tf.transpose(x, [1, 0, 2]), [-1, features])  # (time * batch, features)
        xw = tf.reshape(tf.cast(tf.matmul(x_rows, kernel), bias.dtype) + bias[0], [steps, batch, units3])
        h0_ = tf.cast(h0, bias.dtype)
        hs, saved = _gru_forward(xw, h0_, recurrent_kernel, bias[1])

        def grad(d_out, d_h_last):
            d_out = tf.zeros_like(hs) if d_out is None else tf.cast(tf.transpose(d_out, [1, 0, 2]), hs.dtype)
            d_h_last = tf.zeros_like(h0_) if d_h_last is None else tf.cast(d_h_last, hs.dtype)
            d_xs, d_inners, dh0 = _gru_backward(d_out, d_h_last, h0_, hs, saved, recurrent_kernel)
            d_x_rows = tf.reshape(d_xs, [-1, units3])
            d_inner_rows = tf.reshape(d_inners, [-1, units3])
            d_x_low = tf.cast(d_x_rows, kernel.dtype)  # the weight matmuls in the kernels' dtype
            h_prev = tf.reshape(tf.concat([h0_[None], hs[:-1]], axis=0), [-1, tf.shape(h0)[1]])
            d_kernel = tf.matmul(x_rows, d_x_low, transpose_a=True)
            d_recurrent = tf.matmul(tf.cast(h_prev, kernel.dtype), tf.cast(d_inner_rows, kernel.dtype),
                                    transpose_a=True)
            d_bias = tf.stack([tf.reduce_sum(d_x_rows, axis=0), tf.reduce_sum(d_inner_rows, axis=0)])
            dx = tf.transpose(tf.reshape(tf.matmul(d_x_low, kernel, transpose_b=True), [steps, batch, features]),
                              [1, 0, 2])
            return dx, tf.cast(dh0, h0.dtype), d_kernel, d_recurrent, d_bias

        return (tf.cast(tf.transpose(hs, [1, 0, 2]), x.dtype), tf.cast(hs[-1], x.dtype)), grad

    return run(x, h0, kernel, recurrent_kernel, bias)


# ---------------------------------------------------------------------------
# The layers.
# ---------------------------------------------------------------------------

def _fast_path_applies(layer, mask):
    """Whether `layer` (an LSTM or GRU) may run the CPU loop: Keras's cuDNN conditions, and no GPU."""
    cell = layer.cell
    return (
        keras.backend.backend() == "tensorflow"
        and mask is None
        and not layer.unroll
        and not cell.recurrent_dropout
        and cell.use_bias
        and cell.activation is keras.activations.tanh
        and cell.recurrent_activation is keras.activations.sigmoid
        and getattr(cell, "reset_after", True)
        and _no_gpu()
    )


def _dropped_sequences(layer, sequences, training):
    """The input dropout Keras's cuDNN path applies: one mask per sequence, the same at every step."""
    if training and layer.dropout:
        mask = layer.cell.get_dropout_mask(sequences[:, 0, :])  # (batch, features)
        return sequences * mask[:, None, :]
    return sequences


# The loops run one time step after another, and at batch 64 a step's matmuls
# are too small to keep two cores busy (1x256 LSTM: 1.5 of 2 cores, where
# PyTorch used 2.0). Splitting the batch into independent loops, one per core,
# lets TensorFlow's inter-op threads run them side by side: 1x256 LSTM forward
# and backward 188 -> 121 ms at batch 64, 2x512 unchanged (387 -> 390),
# measured on 2 cores; more cores than 2 are not measured, so at most 2 parts.
MAX_BATCH_PARTS = 2
MIN_ROWS_PER_PART = 16


def intra_op_threads():
    """TensorFlow's intra-op thread count that runs these layers fastest on this
    machine's CPU: its cores shared among the `MAX_BATCH_PARTS` loops.

    Each loop's small per-step matmuls gain nothing from more threads: handed to
    the shared intra-op pool, they wait behind the other loop's and keep its
    threads spinning. With one intra-op thread on 2 cores, each runs inline on
    its loop's own inter-op thread: training tokens/s +6% (1x256 LSTM) to +13%
    (2x512 LSTM), the export's sampling loop 1.8x (docs/lm.md, "Threads").
    Measured on 2 cores only; with more, each loop keeps its share. None
    (TensorFlow's choice) where a GPU is visible: the cuDNN kernels run there.
    Reads the physical devices only, so TensorFlow has not started after it.
    """
    if tf.config.list_physical_devices("GPU"):
        return None
    return max(1, _cores() // MAX_BATCH_PARTS)


def _cores():
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _batch_parts(x):
    """How many independent loops to split `x`'s batch into."""
    threads = tf.config.threading.get_inter_op_parallelism_threads() or _cores()
    parts = min(MAX_BATCH_PARTS, threads)
    batch = x.shape[0]
    return parts if batch is None else max(1, min(parts, batch // MIN_ROWS_PER_PART))


def _split_batch(sequence, tensors, parts):
    """`sequence(*tensors)`'s results, computed on `parts` slices of the batch
    (the first axis of every tensor) and joined again."""
    if parts == 1:
        return sequence(*tensors)
    batch = tf.shape(tensors[0])[0]
    bounds = [batch * i // parts for i in range(parts + 1)]
    pieces = [sequence(*[t[bounds[i]:bounds[i + 1]] for t in tensors]) for i in range(parts)]
    return tuple(tf.concat(list(results), axis=0) for results in zip(*pieces))


def _static_shapes(x, states, outputs, *, units):
    """Gives the loop's results the shapes their inputs fix: `tf.shape` arithmetic
    inside the loops loses them, and a caller's own `tf.while_loop` carrying the
    state (the export's chunked scoring) refuses a batch that became None."""
    outputs.set_shape([x.shape[0], x.shape[1], units])
    for state, initial in states:
        state.set_shape(initial.shape)


@keras.saving.register_keras_serializable(package="dlsuite")
class FusedLSTM(keras.layers.LSTM):
    """`keras.layers.LSTM` with a fast CPU training loop (see the module docstring); same arguments."""

    def inner_loop(self, sequences, initial_state, mask, training=False):
        if keras.tree.is_nested(mask):
            mask = mask[0]
        if not _fast_path_applies(self, mask):
            return super().inner_loop(sequences, initial_state, mask, training=training)
        x = _dropped_sequences(self, sequences, training)
        if self.go_backwards:
            x = tf.reverse(x, axis=[1])
        dtype = x.dtype
        weights = [tf.cast(w, dtype) for w in (self.cell.kernel, self.cell.recurrent_kernel)]
        weights.append(tf.cast(self.cell.bias, _state_dtype(dtype)))
        outputs, h, c = _split_batch(
            lambda x, h0, c0: _lstm_sequence(x, h0, c0, *weights),
            [x, tf.cast(initial_state[0], dtype), tf.cast(initial_state[1], dtype)], _batch_parts(x))
        _static_shapes(x, [(h, initial_state[0]), (c, initial_state[1])], outputs, units=self.units)
        return h, outputs, [h, c]


@keras.saving.register_keras_serializable(package="dlsuite")
class FusedGRU(keras.layers.GRU):
    """`keras.layers.GRU` with a fast CPU training loop (see the module docstring); same arguments."""

    def inner_loop(self, sequences, initial_state, mask, training=False):
        if keras.tree.is_nested(mask):
            mask = mask[0]
        if not _fast_path_applies(self, mask):
            return super().inner_loop(sequences, initial_state, mask, training=training)
        if keras.tree.is_nested(initial_state):
            initial_state = initial_state[0]
        x = _dropped_sequences(self, sequences, training)
        if self.go_backwards:
            x = tf.reverse(x, axis=[1])
        dtype = x.dtype
        weights = [tf.cast(w, dtype) for w in (self.cell.kernel, self.cell.recurrent_kernel)]
        weights.append(tf.cast(self.cell.bias, _state_dtype(dtype)))
        outputs, h = _split_batch(lambda x, h0: _gru_sequence(x, h0, *weights),
                                  [x, tf.cast(initial_state, dtype)], _batch_parts(x))
        _static_shapes(x, [(h, initial_state)], outputs, units=self.units)
        return h, outputs, [h]
