// LayerNorm over the last axis (biased variance, as torch), forward and backward.
// Forward keeps mean and 1/std per row for the backward pass instead of recomputing them.

struct LayerNormDims {
  rows: u32,
  cols: u32,
  weight_offset: u32,  // in floats, into params / grads
  bias_offset: u32,
  eps_bits: u32,       // LAYER_NORM_EPS as f32 bits, so the constant has one source (shared/model.py)
  accumulate: u32,     // backward_input: 1 adds into out (the residual gradient), 0 overwrites
  pad0: u32,
  pad1: u32,
}

@group(0) @binding(0) var<storage, read> x: array<f32>;
@group(0) @binding(1) var<storage, read> params: array<f32>;
@group(0) @binding(2) var<storage, read_write> out: array<f32>;
@group(0) @binding(3) var<storage, read_write> stats: array<f32>;  // mean[rows] then rstd[rows]
@group(0) @binding(4) var<storage, read> grad_out: array<f32>;
@group(0) @binding(5) var<storage, read_write> grads: array<f32>;
@group(0) @binding(6) var<storage, read> dims: LayerNormDims;

@compute @workgroup_size(64)
fn layer_norm_forward(@builtin(global_invocation_id) gid: vec3<u32>) {
  let row = gid.x;
  if (row >= dims.rows) { return; }
  let base = row * dims.cols;
  var sum = 0.0;
  for (var c = 0u; c < dims.cols; c++) { sum += x[base + c]; }
  let mean = sum / f32(dims.cols);
  var sq = 0.0;
  for (var c = 0u; c < dims.cols; c++) { let d = x[base + c] - mean; sq += d * d; }
  let rstd = 1.0 / sqrt(sq / f32(dims.cols) + bitcast<f32>(dims.eps_bits));
  for (var c = 0u; c < dims.cols; c++) {
    out[base + c] = (x[base + c] - mean) * rstd * params[dims.weight_offset + c] + params[dims.bias_offset + c];
  }
  stats[row] = mean;
  stats[dims.rows + row] = rstd;
}

// dx = rstd * (g - mean(g) - xhat * mean(g * xhat)), g = dy * weight; added into out (the residual gradient).
@compute @workgroup_size(64)
fn layer_norm_backward_input(@builtin(global_invocation_id) gid: vec3<u32>) {
  let row = gid.x;
  if (row >= dims.rows) { return; }
  let base = row * dims.cols;
  let mean = stats[row];
  let rstd = stats[dims.rows + row];
  var sum_g = 0.0;
  var sum_g_xhat = 0.0;
  for (var c = 0u; c < dims.cols; c++) {
    let g = grad_out[base + c] * params[dims.weight_offset + c];
    sum_g += g;
    sum_g_xhat += g * (x[base + c] - mean) * rstd;
  }
  let mean_g = sum_g / f32(dims.cols);
  let mean_g_xhat = sum_g_xhat / f32(dims.cols);
  for (var c = 0u; c < dims.cols; c++) {
    let g = grad_out[base + c] * params[dims.weight_offset + c];
    let xhat = (x[base + c] - mean) * rstd;
    let dx = rstd * (g - mean_g - xhat * mean_g_xhat);
    if (dims.accumulate != 0u) { out[base + c] += dx; } else { out[base + c] = dx; }
  }
}

// One invocation per column sums over rows in order: deterministic weight and bias gradients.
@compute @workgroup_size(64)
fn layer_norm_backward_params(@builtin(global_invocation_id) gid: vec3<u32>) {
  let c = gid.x;
  if (c >= dims.cols) { return; }
  var d_weight = 0.0;
  var d_bias = 0.0;
  for (var row = 0u; row < dims.rows; row++) {
    let dy = grad_out[row * dims.cols + c];
    d_weight += dy * (x[row * dims.cols + c] - stats[row]) * stats[dims.rows + row];
    d_bias += dy;
  }
  grads[dims.weight_offset + c] = d_weight;
  grads[dims.bias_offset + c] = d_bias;
}
