// Prompt lookup, compiled: each request's tokens in one array, the most recent earlier occurrence of the longest
// matching tail n-gram found by a backward scan. drafters/ngram.py's `lookup` is the reference it is tested against.
#pragma once

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "slots.h"

namespace specrollout {

// Continuation of the most recent earlier occurrence of the longest matching tail n-gram (n from max_n down to
// min_n), at most max_tokens tokens; the tail itself is not an occurrence.
inline void ngram_lookup(const int32_t* tokens, int64_t n_tok, int max_tokens, int min_n, int max_n,
                         std::vector<int32_t>& out) {
    out.clear();
    for (int64_t n = std::min<int64_t>(max_n, n_tok - 1); n >= min_n; --n) {
        const int32_t* tail = tokens + (n_tok - n);
        for (int64_t i = n_tok - 1 - n; i >= 0; --i) {
            if (std::equal(tail, tail + n, tokens + i)) {
                const int64_t start = i + n;
                const int64_t stop = std::min<int64_t>(start + max_tokens, n_tok);
                out.assign(tokens + start, tokens + stop);
                return;
            }
        }
    }
}

class NgramCore {
  public:
    NgramCore(int min_n, int max_n) : min_n_(min_n), max_n_(max_n) {}

    int32_t begin(const int32_t* prompt, int64_t n) {
        const int32_t slot = requests_.acquire();
        requests_[slot].tokens.assign(prompt, prompt + n);
        requests_[slot].alive = true;
        return slot;
    }

    void observe(int32_t slot, const int32_t* tokens, int64_t n) {
        std::vector<int32_t>& t = live(slot);
        t.insert(t.end(), tokens, tokens + n);
    }

    void end(int32_t slot) {
        std::vector<int32_t>().swap(live(slot));
        requests_[slot].alive = false;
        requests_.release(slot);
    }

    void propose(int32_t slot, int max_tokens, std::vector<int32_t>& out) {
        out.clear();
        if (max_tokens <= 0) return;
        const std::vector<int32_t>& t = live(slot);
        ngram_lookup(t.data(), static_cast<int64_t>(t.size()), max_tokens, min_n_, max_n_, out);
    }

    void check_live(int32_t slot) const {
        if (!requests_.contains(slot) || !requests_[slot].alive) {
            throw std::out_of_range("ngram drafter: no request in flight in slot " + std::to_string(slot));
        }
    }

  private:
    struct Request {
        std::vector<int32_t> tokens;
        bool alive = false;
    };

    std::vector<int32_t>& live(int32_t slot) {
        check_live(slot);
        return requests_[slot].tokens;
    }

    int min_n_, max_n_;
    Slots<Request> requests_;
};

}  // namespace specrollout
