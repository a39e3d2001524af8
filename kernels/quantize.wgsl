// Blockwise int8 quantisation of (minuend - subtrahend), and its inverse; the exact rule is in kernels/quant.py.
// Everything that decides a byte is integer arithmetic on float bits: WGSL division is only accurate to
// 2.5 ulp and may flush subnormals, and the bytes must equal the Python, numpy and torch codecs exactly.

struct QuantizeDims {
  count: u32,
  pad0: u32,
  pad1: u32,
  pad2: u32,
}

@group(0) @binding(0) var<storage, read> minuend: array<f32>;
@group(0) @binding(1) var<storage, read> subtrahend: array<f32>;
@group(0) @binding(2) var<storage, read_write> codes: array<u32>;   // int8 codes, 4 per u32, little-endian
@group(0) @binding(3) var<storage, read_write> scales: array<f32>;  // one per block of 256
@group(0) @binding(4) var<storage, read_write> values: array<f32>;  // dequantize output
@group(0) @binding(5) var<storage, read> dims: QuantizeDims;

const BLOCK: u32 = 256u;
// Blocks with max|x| < 2^-100 quantise to zero (scale 0): far above the subnormals a GPU may flush,
// so flushing can never change a byte.
const MIN_AMAX_EXPONENT_FIELD: u32 = 27u;

var<workgroup> block_amax_bits: atomic<u32>;

fn mantissa_of(bits: u32) -> u32 {
  let field = bits >> 23u;
  if (field == 0u) { return bits & 0x7fffffu; }
  return (bits & 0x7fffffu) | 0x800000u;
}

fn exponent_of(bits: u32) -> u32 {
  return max(bits >> 23u, 1u);
}

// float32(amax / 127), rounded to nearest even, for amax >= 2^-100 (so the result is normal).
fn scale_bits_of(amax_bits: u32) -> u32 {
  let m = mantissa_of(amax_bits);
  let field = amax_bits >> 23u;
  let scaled = m << 8u;                  // in [2^31, 2^32)
  let quotient = scaled / 127u;          // 25 or 26 significant bits
  let remainder = scaled - quotient * 127u;
  var mantissa: u32;
  var guard: u32;
  var sticky = remainder != 0u;
  var exponent: u32;
  if (quotient >= (1u << 25u)) {
    mantissa = quotient >> 2u;
    guard = (quotient >> 1u) & 1u;
    sticky = sticky || (quotient & 1u) != 0u;
    exponent = field - 6u;
  } else {
    mantissa = quotient >> 1u;
    guard = quotient & 1u;
    exponent = field - 7u;
  }
  if (guard == 1u && (sticky || (mantissa & 1u) == 1u)) { mantissa += 1u; }
  if (mantissa == (1u << 24u)) { mantissa = 1u << 23u; exponent += 1u; }
  return (exponent << 23u) | (mantissa & 0x7fffffu);
}

// round-half-away-from-zero(127 * |x| / amax) exactly, as an integer in [0, 127].
fn code_magnitude(abs_bits: u32, amax_bits: u32) -> u32 {
  let shift = exponent_of(amax_bits) - exponent_of(abs_bits);
  if (abs_bits == 0u || shift > 8u) { return 0u; }  // 127 |x| / amax < 1/2
  let numerator = 127u * mantissa_of(abs_bits);      // < 2^31
  let denominator = mantissa_of(amax_bits) << shift;  // < 2^32
  let q = numerator / denominator;
  let remainder = numerator - q * denominator;
  var rounded = q;
  if (remainder >= denominator - remainder) { rounded += 1u; }
  return min(rounded, 127u);
}

@compute @workgroup_size(64)
fn quantize_int8_blocks(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>,
                        @builtin(local_invocation_index) lid: u32) {
  let block = wid.y * groups.x + wid.x;
  let first = block * BLOCK + lid * 4u;
  var abs_bits: array<u32, 4>;
  var negative: array<u32, 4>;
  var local_max = 0u;
  for (var e = 0u; e < 4u; e++) {
    let i = first + e;
    var bits = 0u;
    if (i < dims.count) { bits = bitcast<u32>(minuend[i] - subtrahend[i]); }
    abs_bits[e] = bits & 0x7fffffffu;
    negative[e] = bits >> 31u;
    local_max = max(local_max, abs_bits[e]);
  }
  if (lid == 0u) { atomicStore(&block_amax_bits, 0u); }
  workgroupBarrier();
  atomicMax(&block_amax_bits, local_max);  // ordering abs bits as u32 orders finite floats
  workgroupBarrier();
  let amax_bits = atomicLoad(&block_amax_bits);
  if (block * BLOCK >= dims.count) { return; }
  let zero_block = (amax_bits >> 23u) < MIN_AMAX_EXPONENT_FIELD;
  var packed = 0u;
  for (var e = 0u; e < 4u; e++) {
    var q = 0u;
    if (!zero_block && first + e < dims.count) { q = code_magnitude(abs_bits[e], amax_bits); }
    if (negative[e] == 1u) { q = (256u - q) & 0xffu; }  // two's complement byte
    packed |= q << (8u * e);
  }
  if (first < dims.count) { codes[first / 4u] = packed; }
  if (lid == 0u) {
    if (zero_block) { scales[block] = 0.0; } else { scales[block] = bitcast<f32>(scale_bits_of(amax_bits)); }
  }
}

// values[i] = code[i] * scale[block]: one correctly rounded f32 product, as in every other codec.
@compute @workgroup_size(256)
fn dequantize_int8_blocks(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>) {
  let i = gid.y * groups.x * 256u + gid.x;
  if (i >= dims.count) { return; }
  let byte = (codes[i / 4u] >> (8u * (i % 4u))) & 0xffu;
  let code = i32(byte) - select(0, 256, byte >= 128u);
  values[i] = f32(code) * scales[i / BLOCK];
}
