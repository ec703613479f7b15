// Every op schema of pyfinetune, in one place, and the Python module `pyfinetune._C`.
// Importing `pyfinetune._C` loads this shared library, which runs the TORCH_LIBRARY
// registrations below and the TORCH_LIBRARY_IMPL registrations of each kernel file.
#include <Python.h>
#include <torch/library.h>

namespace {

// Identity checks for pyfinetune.optim's cached step plan (`_plan_holds`), which runs before every
// planned step: in Python, comparing resnet50's 161 parameters and their 644 state values by
// identity took ~60 us a step on a 2-core CPU (one `operator.is_` call per object), and the
// hyper-parameters of 100 param groups (layer-wise learning rates) ~350 us; here, a few us. None
// of these functions calls back into Python code.

// The optimizer state `state` (a dict: parameter -> dict of its state) holds exactly the keys of
// the list `keys`, in order, mapped to the dicts of the list `dicts`, which together hold exactly
// the values of the list `values` (each dict's values in its order, dict after dict). False (never
// an error) when any of them is not what it should be, a non-dict included.
PyObject* state_holds(PyObject* /*module*/, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs != 4 || !PyList_Check(args[1]) || !PyList_Check(args[2]) || !PyList_Check(args[3])) {
    PyErr_SetString(PyExc_TypeError, "_state_holds(state, keys, dicts, values) takes a dict and 3 lists");
    return nullptr;
  }
  PyObject* state = args[0];
  PyObject* keys = args[1];
  PyObject* dicts = args[2];
  PyObject* values = args[3];
  if (!PyDict_Check(state) || PyDict_Size(state) != PyList_GET_SIZE(keys) ||
      PyList_GET_SIZE(dicts) != PyList_GET_SIZE(keys)) {
    Py_RETURN_FALSE;
  }
  const Py_ssize_t n_values = PyList_GET_SIZE(values);
  Py_ssize_t pos = 0, i = 0, j = 0;
  PyObject *key = nullptr, *value = nullptr;
  while (PyDict_Next(state, &pos, &key, &value)) {
    if (key != PyList_GET_ITEM(keys, i) || value != PyList_GET_ITEM(dicts, i) || !PyDict_Check(value)) {
      Py_RETURN_FALSE;
    }
    ++i;
    Py_ssize_t inner = 0;
    PyObject *k = nullptr, *v = nullptr;
    while (PyDict_Next(value, &inner, &k, &v)) {
      if (j >= n_values || v != PyList_GET_ITEM(values, j)) {
        Py_RETURN_FALSE;
      }
      ++j;
    }
  }
  if (j != n_values) {
    Py_RETURN_FALSE;
  }
  Py_RETURN_TRUE;
}

// pyfinetune.optim's `_freeze(value) == frozen`, without building the new snapshot: the same type
// and, for float / int / bool / str / None, the same value (a float NaN equals nothing), for tuple /
// list the same length and each element so (against the elements frozen then), else the very
// object (`frozen` = (type, id, value)). 1 equal, 0 not; never an error, never calls Python code
// (int and str compare in C).
int frozen_equal(PyObject* value, PyObject* frozen) {
  if (!PyTuple_Check(frozen) || PyTuple_GET_SIZE(frozen) < 2) {
    return 0;
  }
  PyObject* type = PyTuple_GET_ITEM(frozen, 0);
  if (reinterpret_cast<PyObject*>(Py_TYPE(value)) != type) {
    return 0;
  }
  PyObject* then = PyTuple_GET_ITEM(frozen, 1);
  if (type == reinterpret_cast<PyObject*>(&PyFloat_Type)) {
    return PyFloat_Check(then) && PyFloat_AS_DOUBLE(value) == PyFloat_AS_DOUBLE(then);
  }
  if (type == reinterpret_cast<PyObject*>(&PyLong_Type) || type == reinterpret_cast<PyObject*>(&PyUnicode_Type)) {
    if (Py_TYPE(then) != Py_TYPE(value)) {
      return 0;
    }
    const int eq = PyObject_RichCompareBool(value, then, Py_EQ);
    if (eq < 0) {
      PyErr_Clear();
      return 0;
    }
    return eq;
  }
  if (type == reinterpret_cast<PyObject*>(&PyBool_Type) || value == Py_None) {
    return value == then;
  }
  if (type == reinterpret_cast<PyObject*>(&PyTuple_Type) || type == reinterpret_cast<PyObject*>(&PyList_Type)) {
    if (!PyTuple_Check(then)) {
      return 0;
    }
    const Py_ssize_t n = PySequence_Fast_GET_SIZE(value);  // a tuple or a list: no conversion
    if (n != PyTuple_GET_SIZE(then)) {
      return 0;
    }
    PyObject** items = PySequence_Fast_ITEMS(value);
    for (Py_ssize_t i = 0; i < n; ++i) {
      if (!frozen_equal(items[i], PyTuple_GET_ITEM(then, i))) {
        return 0;
      }
    }
    return 1;
  }
  return PyTuple_GET_SIZE(frozen) == 3 && PyTuple_GET_ITEM(frozen, 2) == value;
}

// The param groups `groups` (a list) are the dicts of the list `cached`, in order, each holding
// under "params" exactly the objects of the tuple params[i] and under each key of the tuple `keys`
// a value equal (frozen_equal) to hypers[i][j]. False (never an error) otherwise.
PyObject* groups_hold(PyObject* /*module*/, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs != 5 || !PyList_Check(args[0]) || !PyList_Check(args[1]) || !PyList_Check(args[2]) ||
      !PyTuple_Check(args[3]) || !PyList_Check(args[4])) {
    PyErr_SetString(PyExc_TypeError, "_groups_hold(groups, cached, params, keys, hypers) takes 4 lists and a tuple");
    return nullptr;
  }
  PyObject* groups = args[0];
  PyObject* cached = args[1];
  PyObject* params = args[2];
  PyObject* keys = args[3];
  PyObject* hypers = args[4];
  const Py_ssize_t n = PyList_GET_SIZE(groups);
  if (PyList_GET_SIZE(cached) != n || PyList_GET_SIZE(params) != n || PyList_GET_SIZE(hypers) != n) {
    Py_RETURN_FALSE;
  }
  static PyObject* params_key = PyUnicode_InternFromString("params");
  const Py_ssize_t n_keys = PyTuple_GET_SIZE(keys);
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyObject* group = PyList_GET_ITEM(groups, i);
    PyObject* frozen = PyList_GET_ITEM(hypers, i);
    PyObject* then = PyList_GET_ITEM(params, i);
    if (group != PyList_GET_ITEM(cached, i) || !PyDict_Check(group) || !PyTuple_Check(frozen) ||
        PyTuple_GET_SIZE(frozen) != n_keys || !PyTuple_Check(then)) {
      Py_RETURN_FALSE;
    }
    PyObject* now = PyDict_GetItemWithError(group, params_key);  // borrowed
    if (now == nullptr || !(PyList_Check(now) || PyTuple_Check(now))) {
      PyErr_Clear();
      Py_RETURN_FALSE;
    }
    const Py_ssize_t m = PySequence_Fast_GET_SIZE(now);
    if (m != PyTuple_GET_SIZE(then)) {
      Py_RETURN_FALSE;
    }
    PyObject** items = PySequence_Fast_ITEMS(now);
    for (Py_ssize_t k = 0; k < m; ++k) {
      if (items[k] != PyTuple_GET_ITEM(then, k)) {
        Py_RETURN_FALSE;
      }
    }
    for (Py_ssize_t j = 0; j < n_keys; ++j) {
      PyObject* value = PyDict_GetItemWithError(group, PyTuple_GET_ITEM(keys, j));  // borrowed
      if (value == nullptr || !frozen_equal(value, PyTuple_GET_ITEM(frozen, j))) {
        PyErr_Clear();
        Py_RETURN_FALSE;
      }
    }
  }
  Py_RETURN_TRUE;
}

// The indices i of the param groups (a list of dicts) whose "lr" is not frozen_equal to lrs[i] (a
// list of `_freeze` snapshots, one per group): the learning rates an LR scheduler changed. A
// group without "lr" counts as changed. A list of ints.
PyObject* changed_lrs(PyObject* /*module*/, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs != 2 || !PyList_Check(args[0]) || !PyList_Check(args[1]) ||
      PyList_GET_SIZE(args[0]) != PyList_GET_SIZE(args[1])) {
    PyErr_SetString(PyExc_TypeError, "_changed_lrs(groups, lrs) takes two lists of one length");
    return nullptr;
  }
  static PyObject* lr_key = PyUnicode_InternFromString("lr");
  PyObject* out = PyList_New(0);
  if (out == nullptr) {
    return nullptr;
  }
  for (Py_ssize_t i = 0; i < PyList_GET_SIZE(args[0]); ++i) {
    PyObject* group = PyList_GET_ITEM(args[0], i);
    PyObject* lr = PyDict_Check(group) ? PyDict_GetItemWithError(group, lr_key) : nullptr;  // borrowed
    PyErr_Clear();
    if (lr == nullptr || !frozen_equal(lr, PyList_GET_ITEM(args[1], i))) {
      PyObject* index = PyLong_FromSsize_t(i);
      if (index == nullptr || PyList_Append(out, index) < 0) {
        Py_XDECREF(index);
        Py_DECREF(out);
        return nullptr;
      }
      Py_DECREF(index);
    }
  }
  return out;
}

PyMethodDef methods[] = {
    {"_state_holds", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(state_holds)), METH_FASTCALL,
     "_state_holds(state, keys, dicts, values) -> bool: the optimizer state holds exactly these objects."},
    {"_groups_hold", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(groups_hold)), METH_FASTCALL,
     "_groups_hold(groups, cached, params, keys, hypers) -> bool: the param groups are as a plan froze them."},
    {"_changed_lrs", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(changed_lrs)), METH_FASTCALL,
     "_changed_lrs(groups, lrs) -> list: the indices of the groups whose lr differs from its snapshot."},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

extern "C" {
// The ops are reached through torch.ops.pyfinetune; the module itself holds only the identity
// checks above.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};
  return PyModule_Create(&module_def);
}
}

namespace pyfinetune {
void define_step_plan(torch::Library& m);  // csrc/step_plan.cpp
}

TORCH_LIBRARY(pyfinetune, m) {
  // Fused multi-tensor AdamW step with L2-SP, L1 (proximal) and masks. One call updates a whole
  // list of parameters of one device and dtype. Per-tensor hyper-parameters live in the float
  // lists (one entry per parameter), so param groups with different settings share one launch.
  //   steps:      one float32 scalar tensor per parameter on the parameters' device, already
  //               incremented for this step (read, never written).
  //   lr_tensors: empty, or one optional scalar tensor per parameter; where given it overrides
  //               lrs[i] and is read on the device (CUDA-graph capturable learning rate).
  //   anchors:    the pull-back point of L2-SP per parameter (None where l2sp is 0).
  //   masks:      bool per parameter (None: dense); masked entries and their moments are set to 0.
  //   grad_scale/found_inf: GradScaler contract; a nonzero found_inf skips the whole update.
  m.def(
      "fused_adamw_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, "
      "Tensor(c!)[] exp_avg_sqs, Tensor(d!)[] max_exp_avg_sqs, Tensor?[] anchors, Tensor?[] masks, "
      "Tensor[] steps, float[] lrs, Tensor?[] lr_tensors, float[] beta1s, float[] beta2s, "
      "float[] epss, float[] weight_decays, float[] l2sps, float[] l1s, *, bool amsgrad, "
      "bool maximize, bool decoupled_l2sp, Tensor? grad_scale=None, Tensor? found_inf=None) -> ()");

  // Fused multi-tensor SGD (momentum, dampening, Nesterov) step with the same penalties.
  //   momentum_buffers: empty when no parameter of the call uses momentum, else one per parameter.
  //   dampenings: the dampening to use this step; pass 0 on a buffer's first step (the buffer then
  //               becomes the gradient, as in torch.optim.SGD).
  m.def(
      "fused_sgd_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] momentum_buffers, "
      "Tensor?[] anchors, Tensor?[] masks, float[] lrs, Tensor?[] lr_tensors, float[] momentums, "
      "float[] dampenings, float[] weight_decays, float[] l2sps, float[] l1s, *, bool nesterov, "
      "bool maximize, bool decoupled_l2sp, Tensor? grad_scale=None, Tensor? found_inf=None) -> ()");

  // Internal, for pyfinetune.optim's cached step plan: a 64-bit hash of each tensor's dtype, device,
  // layout, sizes and strides (and of None entries), in order. Metadata only: no data is read.
  m.def("_layout_signature(Tensor?[] tensors) -> int");
  // Internal, the same plan's launches held in C++ (torch.classes.pyfinetune.StepPlan, no schema of
  // its own beyond its methods): pyfinetune.optim runs a step that nothing changed with one call.
  pyfinetune::define_step_plan(m);

  // Masked matmul, dense masked path: y = x @ (weight * mask)^T + bias.
  //   x [N, K] (the Python wrapper flattens leading dims), weight [M, K], mask [M, K] bool,
  //   bias None or [M]; x, weight, bias share one float dtype; accumulation in float32.
  m.def("masked_matmul(Tensor x, Tensor weight, Tensor mask, Tensor? bias) -> Tensor");
  // Its backward. output_mask = (need dx, need dweight, need dbias); an output not needed is
  // returned as an empty tensor. dweight = (grad_out^T @ x) * mask (0 at pruned positions), or the
  // full grad_out^T @ x when dense_grad (movement pruning, regrowth).
  m.def(
      "masked_matmul_backward(Tensor grad_out, Tensor x, Tensor weight, Tensor mask, bool[3] output_mask, "
      "bool dense_grad) -> (Tensor, Tensor, Tensor)");

  // Sparse linear over a compressed-row weight W [M, K] (SparseLinear): y = x @ W^T + bias.
  //   x [N, K]; values [nnz] (x's dtype); crow_indices [M + 1], col_indices [nnz] (int32, columns
  //   sorted within a row); row_order [M] int32: the rows sorted by decreasing length (load
  //   balance); bias None or [M].
  m.def(
      "csr_linear(Tensor x, Tensor values, Tensor crow_indices, Tensor col_indices, Tensor row_order, "
      "Tensor? bias) -> Tensor");
  // Its backward: dx = grad_out @ W computed over the compressed-column view of the same pattern
  // (ccol_indices [K + 1], row_indices [nnz], csc_to_csr [nnz]: the position in `values` of each
  // compressed-column entry, so no transposed copy of the values is built); dvalues = the sampled
  // product (grad_out^T @ x) at the kept positions only (SDDMM); dbias = grad_out summed over rows.
  // output_mask = (need dx, need dvalues, need dbias); an output not needed is an empty tensor.
  m.def(
      "csr_linear_backward(Tensor grad_out, Tensor x, Tensor values, Tensor crow_indices, "
      "Tensor col_indices, Tensor row_order, Tensor ccol_indices, Tensor row_indices, Tensor csc_to_csr, "
      "bool[3] output_mask) -> (Tensor, Tensor, Tensor)");
  // The dense weight [M, cols] of a compressed-row pattern and back (SparseLinear's dense path):
  // csr_to_dense writes each row once, zeros and the row's kept values (values [nnz], any float
  // dtype; crow_indices [M + 1], col_indices [nnz] int32 on the values' device, columns in [0,
  // cols), increasing strictly within a row); csr_gather reads the kept positions of a
  // dense [M, K] tensor (any strides) into [nnz] in the pattern's order. Each is the other's
  // gradient. csr_to_dense_into writes every element of `out` (contiguous [M, cols], the values'
  // dtype and device): a buffer reused across calls costs no page faults on the CPU.
  // The same product from the kept weights regrouped in tiles (SparseLinear's forward on CUDA tensor
  // cores, float16 / bfloat16): tiles of 128 rows x 64 columns of W [M = out_features, K], numbered
  // row-block-major; tile i holds entries tile_ptr[i] .. tile_ptr[i + 1] - 1 (tile_ptr int32
  // [ceil(M / 128) * ceil(K / 64) + 1]) with values tile_values (x's dtype) and places tile_loc
  // (int16: row within the tile * 64 + column within the tile, distinct within a tile). Built by
  // pyfinetune.ops.tiled_pattern. y = x @ W^T + bias, float32 accumulation, rounded once.
  m.def(
      "tiled_csr_linear(Tensor x, Tensor tile_values, Tensor tile_ptr, Tensor tile_loc, int out_features, "
      "Tensor? bias) -> Tensor");
  // Its input gradient: grad_out [N, M] @ W [M, K = in_features] -> [N, K], from the same tiles (on
  // CUDA: tensor cores, each tile read transposed from shared memory).
  m.def(
      "tiled_csr_linear_backward_input(Tensor grad_out, Tensor tile_values, Tensor tile_ptr, Tensor tile_loc, "
      "int in_features) -> Tensor");
  // Its weight gradient at the kept positions: dvalues [nnz] in compressed-row order, dvalues[tile_src[e]]
  // = (grad_out^T @ x) at tile entry e (tile_src int32 [nnz], from pyfinetune.ops.tiled_pattern); on
  // CUDA each non-empty tile's block of grad_out^T @ x on tensor cores, float32 accumulation.
  m.def(
      "tiled_csr_linear_backward_values(Tensor grad_out, Tensor x, Tensor tile_ptr, Tensor tile_loc, "
      "Tensor tile_src) -> Tensor");
  m.def("csr_to_dense(Tensor values, Tensor crow_indices, Tensor col_indices, int cols) -> Tensor");
  m.def("csr_to_dense_into(Tensor(a!) out, Tensor values, Tensor crow_indices, Tensor col_indices) -> ()");
  m.def("csr_gather(Tensor dense, Tensor crow_indices, Tensor col_indices) -> Tensor");
  // Internal, for SparseLinear's dense path on the CPU (csrc/cpu/dense_pool.cpp): an uninitialized
  // CPU tensor whose memory returns to a pool when its storage dies (idle blocks kept up to
  // idle_limit_bytes), the release of the idle blocks (bytes freed), and their total.
  m.def("_pool_empty_cpu(int[] size, ScalarType dtype, int idle_limit_bytes) -> Tensor");
  m.def("_pool_release_cpu() -> int");
  m.def("_pool_idle_bytes_cpu() -> int");
  // The idle-bytes limit from PYFINETUNE_DENSE_POOL_MB (one parser for C++ and Python; ValueError).
  m.def("_pool_env_limit_cpu() -> int");
  // Whether the CPU optimizer kernels prefetch in software (PYFINETUNE_CPU_PREFETCH, else the CPU's
  // vendor; ValueError for a bad value), for pyfinetune info.
  m.def("_optim_cpu_prefetch() -> bool");
  // Fused distillation loss, forward with the gradient (one kernel family, no softmax tensors).
  //   student, teacher: [N, V] logits (any float dtype each; unit stride along V, any row stride);
  //   labels: None or int64 [N]. divergence: "forward_kl" | "reverse_kl" | "jsd".
  //   Returns (loss [N] float32: the per-row loss, 0 for ignored rows;
  //            grad: grad_scale * d(row loss)/d(student) [N, V] in the student's dtype, contiguous,
  //            or an empty tensor when need_grad is false). The backward only scales grad.
  //   grad_scale (finite > 0): a factor the kept gradient is computed with, so that a caller who
  //   knows the reduction's factor (1 / rows of a batch mean) need not scale it afterwards.
  m.def(
      "kd_loss_fwd(Tensor student, Tensor teacher, Tensor? labels, *, float temperature, float alpha, "
      "str divergence, float beta, int ignore_index, bool need_grad, float grad_scale=1.0) -> (Tensor, Tensor)");
  // The same with the gradient written over `student` (which must be contiguous and share no memory
  // with teacher or labels): for a caller that owns the student buffer and needs no copy of it
  // afterwards (fused_linear_kd_loss's chunk logits: one chunk-sized buffer fewer). Returns the loss
  // rows; student then holds grad_scale * d(row loss)/d(student) (zeros in ignored rows).
  m.def(
      "kd_loss_fwd_inplace(Tensor(a!) student, Tensor teacher, Tensor? labels, *, float temperature, float alpha, "
      "str divergence, float beta, int ignore_index, float grad_scale=1.0) -> Tensor");
  // The same with a teacher saved as its top-k logits per row: teacher_values [N, k] (float),
  // teacher_indices [N, k] int64 in [0, V), distinct within a row. The teacher distribution is the
  // softmax over its k entries at temperature T (0 elsewhere).
  m.def(
      "kd_loss_topk_fwd(Tensor student, Tensor teacher_values, Tensor teacher_indices, Tensor? labels, *, "
      "float temperature, float alpha, str divergence, float beta, int ignore_index, bool need_grad, "
      "float grad_scale=1.0) -> (Tensor, Tensor)");
  // Internal, for the losses' backward (pyfinetune.ops.scale_kept_gradients): grad *= scale in
  // place, scale being one element on grad's device read there (no host synchronization), in
  // grad's arithmetic dtype (float64 for a float64 grad, else float32: the product is rounded once
  // to grad's dtype, as grad.mul_(float) rounds it). A scale of exactly 1 writes nothing (on a GPU
  // the blocks return at once). grad: a contiguous float32 / float64 / bfloat16 / float16 tensor.
  m.def("_scale_kept_(Tensor(a!) grad, Tensor scale) -> ()");
}
