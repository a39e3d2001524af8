// The GPT's matrix products, row-major float32, viewed as vec4 along the contiguous axis.
// Each invocation owns a 4x4 block of outputs held in registers: on SwiftShader and llvmpipe this beats
// shared-memory tiling, whose barriers cost more than the loads they save.
//
// The same five bindings serve every entry point; what each one means is written at the entry point.
// Offsets are in vec4 units, so every matrix must start at a multiple of 4 floats.

struct MatmulDims {
  rows: u32,         // rows of the output
  cols: u32,         // columns of the output (a multiple of 4)
  inner: u32,        // length of the summed axis
  lhs_offset: u32,
  rhs_offset: u32,
  bias_offset: u32,
  out_offset: u32,
  flags: u32,        // bit 0: add bias, bit 1: add residual
}

@group(0) @binding(0) var<storage, read> lhs: array<vec4<f32>>;
@group(0) @binding(1) var<storage, read> rhs: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> residual: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read_write> out: array<vec4<f32>>;
@group(0) @binding(4) var<storage, read> dims: MatmulDims;

// y = x @ W.T (+ b) (+ residual): x is lhs (rows, inner), W and b live in rhs (the parameters), W is (cols, inner).
@compute @workgroup_size(8, 8)
fn linear_forward(@builtin(global_invocation_id) gid: vec3<u32>) {
  let col4 = gid.x;
  let row0 = gid.y * 4u;
  if (col4 * 4u >= dims.cols || row0 >= dims.rows) { return; }
  let inner4 = dims.inner / 4u;
  // Rows past the end re-read the last row so every load stays in bounds; their results are not stored.
  let last = dims.rows - 1u;
  let x0 = dims.lhs_offset + min(row0, last) * inner4;
  let x1 = dims.lhs_offset + min(row0 + 1u, last) * inner4;
  let x2 = dims.lhs_offset + min(row0 + 2u, last) * inner4;
  let x3 = dims.lhs_offset + min(row0 + 3u, last) * inner4;
  let w0 = dims.rhs_offset + (col4 * 4u) * inner4;
  let w1 = w0 + inner4;
  let w2 = w1 + inner4;
  let w3 = w2 + inner4;
  var acc0 = vec4<f32>(0.0);
  var acc1 = vec4<f32>(0.0);
  var acc2 = vec4<f32>(0.0);
  var acc3 = vec4<f32>(0.0);
  for (var k = 0u; k < inner4; k++) {
    let wa = rhs[w0 + k];
    let wb = rhs[w1 + k];
    let wc = rhs[w2 + k];
    let wd = rhs[w3 + k];
    let xa = lhs[x0 + k];
    let xb = lhs[x1 + k];
    let xc = lhs[x2 + k];
    let xd = lhs[x3 + k];
    acc0 += vec4<f32>(dot(xa, wa), dot(xa, wb), dot(xa, wc), dot(xa, wd));
    acc1 += vec4<f32>(dot(xb, wa), dot(xb, wb), dot(xb, wc), dot(xb, wd));
    acc2 += vec4<f32>(dot(xc, wa), dot(xc, wb), dot(xc, wc), dot(xc, wd));
    acc3 += vec4<f32>(dot(xd, wa), dot(xd, wb), dot(xd, wc), dot(xd, wd));
  }
  var bias = vec4<f32>(0.0);
  if ((dims.flags & 1u) != 0u) { bias = rhs[dims.bias_offset + col4]; }
  let cols4 = dims.cols / 4u;
  var results = array<vec4<f32>, 4>(acc0 + bias, acc1 + bias, acc2 + bias, acc3 + bias);
  for (var r = 0u; r < 4u; r++) {
    let row = row0 + r;
    if (row < dims.rows) {
      let o = dims.out_offset + row * cols4 + col4;
      var y = results[r];
      if ((dims.flags & 2u) != 0u) { y += residual[o]; }
      out[o] = y;
    }
  }
}

// dX = dY @ W: dY is lhs (rows, inner), W lives in rhs at rhs_offset and is (inner, cols).
@compute @workgroup_size(8, 8)
fn matmul_grad_input(@builtin(global_invocation_id) gid: vec3<u32>) {
  let col4 = gid.x;
  let row0 = gid.y * 4u;
  if (col4 * 4u >= dims.cols || row0 >= dims.rows) { return; }
  let inner4 = dims.inner / 4u;
  let cols4 = dims.cols / 4u;
  let last = dims.rows - 1u;
  let d0 = dims.lhs_offset + min(row0, last) * inner4;
  let d1 = dims.lhs_offset + min(row0 + 1u, last) * inner4;
  let d2 = dims.lhs_offset + min(row0 + 2u, last) * inner4;
  let d3 = dims.lhs_offset + min(row0 + 3u, last) * inner4;
  var acc0 = vec4<f32>(0.0);
  var acc1 = vec4<f32>(0.0);
  var acc2 = vec4<f32>(0.0);
  var acc3 = vec4<f32>(0.0);
  for (var k = 0u; k < inner4; k++) {
    let w = dims.rhs_offset + (k * 4u) * cols4 + col4;
    let wa = rhs[w];
    let wb = rhs[w + cols4];
    let wc = rhs[w + 2u * cols4];
    let wd = rhs[w + 3u * cols4];
    let da = lhs[d0 + k];
    let db = lhs[d1 + k];
    let dc = lhs[d2 + k];
    let dd = lhs[d3 + k];
    acc0 += da.x * wa + da.y * wb + da.z * wc + da.w * wd;
    acc1 += db.x * wa + db.y * wb + db.z * wc + db.w * wd;
    acc2 += dc.x * wa + dc.y * wb + dc.z * wc + dc.w * wd;
    acc3 += dd.x * wa + dd.y * wb + dd.z * wc + dd.w * wd;
  }
  var results = array<vec4<f32>, 4>(acc0, acc1, acc2, acc3);
  for (var r = 0u; r < 4u; r++) {
    let row = row0 + r;
    if (row < dims.rows) { out[dims.out_offset + row * cols4 + col4] = results[r]; }
  }
}

// dW = dY.T @ X: dY is lhs (inner, rows), X is rhs (inner, cols); out is the gradient vector at out_offset.
// rows (the output features) must be a multiple of 4.
@compute @workgroup_size(8, 8)
fn matmul_grad_weight(@builtin(global_invocation_id) gid: vec3<u32>) {
  let col4 = gid.x;
  let row0 = gid.y * 4u;
  if (col4 * 4u >= dims.cols || row0 >= dims.rows) { return; }
  let rows4 = dims.rows / 4u;
  let cols4 = dims.cols / 4u;
  var acc0 = vec4<f32>(0.0);
  var acc1 = vec4<f32>(0.0);
  var acc2 = vec4<f32>(0.0);
  var acc3 = vec4<f32>(0.0);
  for (var n = 0u; n < dims.inner; n++) {
    let d = lhs[dims.lhs_offset + n * rows4 + gid.y];
    let x = rhs[dims.rhs_offset + n * cols4 + col4];
    acc0 += d.x * x;
    acc1 += d.y * x;
    acc2 += d.z * x;
    acc3 += d.w * x;
  }
  let o = dims.out_offset + row0 * cols4 + col4;
  out[o] = acc0;
  out[o + cols4] = acc1;
  out[o + 2u * cols4] = acc2;
  out[o + 3u * cols4] = acc3;
}

// db = column sums of dY: dY is lhs (inner, cols); out is the gradient vector at out_offset.
@compute @workgroup_size(64)
fn column_sum(@builtin(global_invocation_id) gid: vec3<u32>) {
  let col4 = gid.x;
  let cols4 = dims.cols / 4u;
  if (col4 >= cols4) { return; }
  var acc = vec4<f32>(0.0);
  for (var n = 0u; n < dims.inner; n++) { acc += lhs[dims.lhs_offset + n * cols4 + col4]; }
  out[dims.out_offset + col4] = acc;
}
