// params += decode(delta), in place: a round's published delta applied to the float32 model, bit for bit as
// shared.compress.apply_delta does it (a correctly rounded float32 product q * scale, then a correctly rounded
// float32 sum, both to nearest, ties to even). Every node hashes the result, so no float instruction decides a
// bit here: WGSL lets `*` and `+` round either way and flush subnormals, so both are done on the bits in u32.

struct DeltaDims {
  count: u32,   // values in the model
  block: u32,   // int8: values per block
  blocks: u32,  // int8: the payload's first `blocks` words are the scales, then the codes, 4 per word
  pad: u32,
}

@group(0) @binding(0) var<storage, read_write> params: array<u32>;  // float32 bits, updated in place
@group(0) @binding(1) var<storage, read> delta: array<u32>;  // the codec's raw payload (after inflating), LE words
@group(0) @binding(2) var<storage, read_write> not_finite: atomic<u32>;  // set to 1 when a value cannot be done here
@group(0) @binding(3) var<storage, read> dims: DeltaDims;

const WORKGROUP: u32 = 256u;
const MAGNITUDE: u32 = 0x7fffffffu;
const INFINITY_BITS: u32 = 0x7f800000u;

fn significand_of(magnitude: u32) -> u32 {
  if ((magnitude >> 23u) == 0u) { return magnitude; }  // zero or subnormal
  return (magnitude & 0x7fffffu) | 0x800000u;
}

// The value is significand_of(magnitude) * 2^exponent_of(magnitude).
fn exponent_of(magnitude: u32) -> i32 {
  return max(i32(magnitude >> 23u), 1) - 150;
}

// sig * 2^exp (sig > 0) rounded to a float32 magnitude, to nearest, ties to even; INFINITY_BITS when it overflows.
// A set lowest bit of sig may stand for a nonzero remainder below it (a "jammed" sticky bit) as long as at least
// two bits are dropped: the rounding boundaries are then even and the jammed value sits on the exact one's side.
fn round_to_f32(sig: u32, exp: i32) -> u32 {
  let length = 32 - i32(countLeadingZeros(sig));
  let quantum = max(exp + length - 24, -149);  // the exponent of the result's last bit; -149 for subnormals
  if (quantum + 149 >= 255) { return INFINITY_BITS; }
  let shift = quantum - exp;
  var m: u32;
  if (shift <= 0) {
    m = sig << u32(-shift);  // fits in 24 bits: exact
  } else if (shift >= 32) {
    m = select(0u, 1u, shift == 32 && sig > 0x80000000u);  // below half of the smallest subnormal, or above it
  } else {
    let s = u32(shift);
    m = sig >> s;
    let rest = sig & ((1u << s) - 1u);
    let half = 1u << (s - 1u);
    if (rest > half || (rest == half && (m & 1u) == 1u)) { m += 1u; }
  }
  // Normal: field (quantum + 150) with m in [2^23, 2^24); a carry to 2^24 bumps the field; subnormal: m itself.
  return min((u32(quantum + 149) << 23u) + m, INFINITY_BITS);
}

// float32(q * scale) as bits, for an int8 level q and a finite float32 scale.
fn product_bits(q: i32, scale_bits: u32) -> u32 {
  let sign = (select(0u, 1u, q < 0) ^ (scale_bits >> 31u)) << 31u;
  let magnitude = scale_bits & MAGNITUDE;
  let sig = u32(abs(q)) * significand_of(magnitude);  // < 2^31: exact
  if (sig == 0u) { return sign; }
  return sign | round_to_f32(sig, exponent_of(magnitude));
}

// float32(a + b) as bits, for finite float32 a and b.
fn sum_bits(a: u32, b: u32) -> u32 {
  if (((a | b) & MAGNITUDE) == 0u) { return a & b; }  // two zeros: -0 only when both are
  var big = a;
  var small = b;
  if ((b & MAGNITUDE) > (a & MAGNITUDE)) { big = b; small = a; }  // u32 order of magnitudes is numeric order
  let exp = exponent_of(big & MAGNITUDE);
  let distance = u32(exp - exponent_of(small & MAGNITUDE));
  let big_sig = significand_of(big & MAGNITUDE) << 7u;  // < 2^31, with 7 bits of room below
  var small_sig = significand_of(small & MAGNITUDE) << 7u;
  if (distance >= 31u) {
    small_sig = select(0u, 1u, small_sig != 0u);
  } else if (distance > 0u) {
    small_sig = (small_sig >> distance) | select(0u, 1u, (small_sig & ((1u << distance) - 1u)) != 0u);
  }
  var sig: u32;
  if (((a ^ b) >> 31u) == 0u) { sig = big_sig + small_sig; } else { sig = big_sig - small_sig; }
  if (sig == 0u) { return 0u; }  // exact cancellation is +0 when rounding to nearest
  return (big & 0x80000000u) | round_to_f32(sig, exp - 7);
}

fn add_to_param(i: u32, d: u32) {
  let p = params[i];
  if ((p & INFINITY_BITS) == INFINITY_BITS || (d & INFINITY_BITS) == INFINITY_BITS) {
    atomicMax(&not_finite, 1u);
    return;
  }
  let s = sum_bits(p, d);
  if ((s & INFINITY_BITS) == INFINITY_BITS) { atomicMax(&not_finite, 1u); }
  params[i] = s;
}

fn value_index(wid: vec3<u32>, groups: vec3<u32>, lid: u32) -> u32 {
  return (wid.y * groups.x + wid.x) * WORKGROUP + lid;
}

@compute @workgroup_size(256)
fn apply_int8_delta(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>,
                    @builtin(local_invocation_index) lid: u32) {
  let i = value_index(wid, groups, lid);
  if (i >= dims.count) { return; }
  let byte = (delta[dims.blocks + i / 4u] >> (8u * (i % 4u))) & 0xffu;
  let q = i32(byte) - select(0, 256, byte >= 128u);
  let scale_bits = delta[i / dims.block];
  if ((scale_bits & INFINITY_BITS) == INFINITY_BITS) { atomicMax(&not_finite, 1u); return; }
  add_to_param(i, product_bits(q, scale_bits));
}

@compute @workgroup_size(256)
fn apply_fp32_delta(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>,
                    @builtin(local_invocation_index) lid: u32) {
  let i = value_index(wid, groups, lid);
  if (i >= dims.count) { return; }
  add_to_param(i, delta[i]);
}
