// IEEE binary16 <-> binary32, bit for bit as numpy's float16 casts (round to nearest, ties to even).
// The global index stores the policy's probability of each token as float16, as the Python reference does; the core
// must round exactly as numpy does, or its drafts would differ from the reference's in the last bit of a weight.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

namespace specrollout {

inline float half_to_float(uint16_t h) {
    const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
    const uint32_t exponent = (h >> 10) & 0x1fu;
    const uint32_t mantissa = h & 0x3ffu;
    if (exponent == 0) {  // zero or subnormal: mantissa * 2^-24, exact in float
        const float value = static_cast<float>(mantissa) * (1.0f / 16777216.0f);
        return sign ? -value : value;
    }
    uint32_t bits;
    if (exponent == 31) {
        bits = sign | 0x7f800000u | (mantissa << 13);  // inf or NaN
    } else {
        bits = sign | ((exponent + 112u) << 23) | (mantissa << 13);
    }
    float out;
    std::memcpy(&out, &bits, sizeof out);
    return out;
}

inline uint16_t float_to_half(float value) {
    uint32_t bits;
    std::memcpy(&bits, &value, sizeof bits);
    const uint16_t sign = static_cast<uint16_t>((bits >> 16) & 0x8000u);
    const uint32_t magnitude = bits & 0x7fffffffu;
    if (magnitude > 0x7f800000u) return sign | 0x7e00u;  // NaN (a quiet NaN; only its NaN-ness is ever read)
    if (magnitude >= 0x477ff000u) return sign | 0x7c00u;  // >= 65520 rounds to infinity
    if (magnitude < 0x38800000u) {
        // Below 2^-14: a half subnormal, mantissa = round(value * 2^24); the product is exact (a power of two) and
        // nearbyint rounds ties to even in the default rounding mode. 1024 carries into the smallest normal.
        float scaled;
        std::memcpy(&scaled, &magnitude, sizeof scaled);
        return sign | static_cast<uint16_t>(std::nearbyint(scaled * 16777216.0f));
    }
    // Normal: rebias the exponent (127 -> 15) and round the 13 dropped mantissa bits to nearest even.
    const uint32_t rounded = magnitude + 0x0fffu + ((magnitude >> 13) & 1u);
    return sign | static_cast<uint16_t>((rounded - 0x38000000u) >> 13);
}

}  // namespace specrollout
