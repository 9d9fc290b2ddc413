// The suffix drafter's state and hot path, compiled: drafters/suffix_reference.py is the same algorithm in Python and
// the reference every test holds this to (identical token ids and parents, probabilities to the last bit).
//
// Everything a step reads lives in flat arrays owned here: each in-flight request's prompt + output (int32) and the
// policy's probability of each token (float32, NaN = unknown); the in-flight positions by their three preceding
// tokens; each prompt's earlier rollouts laid end to end per policy version; the global window as one token array
// with hash chains (token_index.py explains that structure). A draft is found by scanning the group's arrays and the
// request itself, walking two hash chains, merging the candidates' continuations into a trie and expanding it
// best-first, with scratch buffers reused from step to step: no allocation per candidate, no interpreter.
//
// Tie-breaking, where the reference is explicit about it too: sources are read in a fixed order (siblings in the order
// they began, the prompt's versions in the order their oldest kept rollout was stored, the request itself, other
// groups newest first, the global window by recency ascending, each newest first); candidates are ranked by weight,
// ties by that order; a node's children are tried in the order the ranked candidates first reached them; the
// best-first expansion breaks equal path probabilities by push order. Floating-point work is done in double, in the
// reference's order of operations, with the same libm pow; the numpy-computed parts (exp of logprobs) are computed
// by the Python wrapper and handed over, and float16 rounding is numpy's (half.h).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <deque>
#include <limits>
#include <numeric>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#include "half.h"
#include "slots.h"

namespace specrollout {

constexpr int32_t kSep = -1;  // between stored sequences; never a token
constexpr float kUnknown = std::numeric_limits<float>::quiet_NaN();

struct TreeConfig {
    int max_candidates = 32;
    double match_power = 4.0;
    int max_match = 32;
    double prior = 1.0;
    double min_prob = 0.05;
    int max_depth = 32;
    double logprob_trust = 0.5;
};

struct SuffixConfig {
    double decay = 0.5;
    double group_weight = 4.0;
    double self_weight = 3.0;
    double global_weight = 1.0;
    int min_match_group = 1;
    int min_match_self = 1;
    int min_match_global = 2;
    int max_rollouts_per_prompt = 64;
    int64_t global_max_tokens = 2000000;
    int prompt_tail = 16;
    int max_walk = 32;
    int bucket_bits = 20;
    TreeConfig tree;
};

// The policy's probability of a token from its logprob: the logprob rounded to float32, exp in double (the C
// library's, as Python's math.exp), rounded to float32 (suffix_reference.py: token_probs). NaN stays NaN.
inline float token_prob(double logprob) {
    return static_cast<float>(std::exp(static_cast<double>(static_cast<float>(logprob))));
}

// A policy version as the global index stores it: modulo 2^16, read back as an age that is right while versions in
// the window are fewer than 32768 apart.
inline int16_t wrap16(int64_t v) {
    return static_cast<int16_t>(static_cast<uint16_t>(static_cast<uint64_t>(v) & 0xffffu));
}

inline int64_t age16(int64_t current, int16_t stored) {
    return static_cast<int64_t>(wrap16(current - static_cast<int64_t>(stored)));
}

// Calls f(i) for each i in [lo, hi) with a[i] == value, in ascending order. Sixteen at a time with SSE2 where the
// compiler has it (every x86-64): the scans of a group's arrays are most of a draft's cost, and most tokens differ.
template <typename F>
inline void for_each_equal(const int32_t* a, int64_t lo, int64_t hi, int32_t value, F&& f) {
    int64_t i = lo;
#if defined(__SSE2__)
    const __m128i v = _mm_set1_epi32(value);
    for (; i + 16 <= hi; i += 16) {
        const auto bits = [&](int k) {
            const __m128i x = _mm_loadu_si128(reinterpret_cast<const __m128i*>(a + i + k));
            return static_cast<unsigned>(_mm_movemask_ps(_mm_castsi128_ps(_mm_cmpeq_epi32(x, v))));
        };
        unsigned mask = bits(0) | bits(4) << 4 | bits(8) << 8 | bits(12) << 12;
        while (mask != 0) {
            f(i + __builtin_ctz(mask));
            mask &= mask - 1;
        }
    }
#endif
    for (; i < hi; ++i) {
        if (a[i] == value) f(i);
    }
}

// How many tokens before `start` equal the context's tail, at most `limit`; the array's start ends a match.
inline int match_length(const int32_t* array, int64_t start, const int32_t* context, int64_t n_context, int limit) {
    const int most = static_cast<int>(std::min<int64_t>(limit, start));  // the array's start ends a match
    int n = 0;
#if defined(__SSE2__)
    // Four tokens at a time, backwards: siblings share long spans, so most candidates match far.
    while (n + 4 <= most) {
        const __m128i a = _mm_loadu_si128(reinterpret_cast<const __m128i*>(array + start - n - 4));
        const __m128i c = _mm_loadu_si128(reinterpret_cast<const __m128i*>(context + n_context - n - 4));
        const unsigned equal = static_cast<unsigned>(_mm_movemask_ps(_mm_castsi128_ps(_mm_cmpeq_epi32(a, c))));
        if (equal != 0xfu) return n + 3 - (31 - __builtin_clz(~equal & 0xfu));  // lane 3 is the nearest token
        n += 4;
    }
#endif
    while (n < most && array[start - 1 - n] == context[n_context - 1 - n]) ++n;
    return n;
}

// ------------------------------------------------------------------------------------------------ candidates, tree

struct Source {
    const int32_t* tokens;
    const float* probs32;     // the policy's probability of each token (NaN: unknown), or
    const uint16_t* probs16;  // the same as float16 bits (the global window)
    int64_t end;              // continuations stop here (exclusive)
    double weight;            // weight of a match of length 1 from this source

    double prob(int64_t i) const {
        if (probs32 != nullptr) return static_cast<double>(probs32[i]);
        if (probs16 != nullptr) return static_cast<double>(half_to_float(probs16[i]));
        return std::numeric_limits<double>::quiet_NaN();
    }
};

struct Candidate {
    int32_t source;
    int32_t match_len;
    int64_t start;
    double weight;    // source weight x match_len ** match_power
    int64_t ordinal;  // position in the order the sources list their matches: breaks ties in weight
};

// The max_candidates best candidates of a draft, kept while they are found: the reference ranks all of them by
// weight with a stable sort and keeps the first max_candidates. Here they are buffered and, whenever the buffer
// holds many, cut to the best max_candidates; from then on a candidate must weigh strictly more than the worst one
// kept, since it comes later (a larger ordinal) and loses every tie. The same ones are kept, and a common token's
// thousands of matches cost one comparison each instead of a place in a sort.
class TopCandidates {
  public:
    void reset(size_t capacity) {
        capacity_ = capacity;
        kept_.clear();
        next_ordinal_ = 0;
        floor_ = -std::numeric_limits<double>::infinity();
    }

    // Whether a candidate of this weight could still be kept (false lets a scan skip a source).
    bool could_keep(double weight) const { return weight > floor_; }

    void offer(int32_t source, int32_t match_len, int64_t start, double weight) {
        const int64_t ordinal = next_ordinal_++;
        if (!(weight > floor_)) return;
        kept_.push_back(Candidate{source, match_len, start, weight, ordinal});
        if (kept_.size() >= std::max<size_t>(4 * capacity_, 64)) cut();
    }

    // The kept candidates, best first (weight descending, ties by ordinal).
    std::vector<Candidate>& ranked() {
        cut();
        std::sort(kept_.begin(), kept_.end(), better);
        return kept_;
    }

  private:
    static bool better(const Candidate& a, const Candidate& b) {
        return a.weight > b.weight || (a.weight == b.weight && a.ordinal < b.ordinal);
    }

    void cut() {
        if (kept_.size() <= capacity_) return;
        const auto last = kept_.begin() + static_cast<std::ptrdiff_t>(capacity_);
        std::nth_element(kept_.begin(), last - 1, kept_.end(), better);
        kept_.resize(capacity_);
        floor_ = kept_.back().weight;  // the worst kept: nth_element put it at the cut
    }

    size_t capacity_ = 0;
    std::vector<Candidate> kept_;
    int64_t next_ordinal_ = 0;
    double floor_ = 0;  // a later candidate is kept only above this weight
};

struct DraftOut {
    std::vector<int32_t> tokens;
    std::vector<int32_t> parents;
    std::vector<double> probs;

    void clear() {
        tokens.clear();
        parents.clear();
        probs.clear();
    }
};

// Merges weighted continuations into a trie and expands it best-first (drafters/matching.py: build_draft).
class TreeBuilder {
  public:
    // candidates: the kept ones, best first (TopCandidates::ranked).
    void build(const std::vector<Source>& sources, const std::vector<Candidate>& candidates, int max_tokens,
               const TreeConfig& cfg, DraftOut& out) {
        out.clear();
        if (max_tokens <= 0 || candidates.empty()) return;
        const int64_t depth = std::min(cfg.max_depth, max_tokens);
        nodes_.clear();
        nodes_.push_back(Node{});
        for (const Candidate& c : candidates) {
            const Source& src = sources[c.source];
            const double w = c.weight;
            nodes_[0].weight += w;
            int32_t node = 0;
            const int64_t stop = std::min(c.start + depth, src.end);
            for (int64_t i = c.start; i < stop; ++i) {
                const int32_t t = src.tokens[i];
                if (t < 0) break;  // separator: the stored sequence ended
                int32_t child = find_child(node, t);
                if (child < 0) child = add_child(node, t);
                Node& ch = nodes_[child];
                ch.weight += w;
                const double p = src.prob(i);
                if (p == p) {  // not NaN
                    ch.p_weight += w;
                    ch.p_sum += w * p;
                }
                node = child;
            }
        }
        heap_.clear();
        counter_ = 0;
        push_children(0, -1, 1.0, cfg);
        while (!heap_.empty() && static_cast<int>(out.tokens.size()) < max_tokens) {
            std::pop_heap(heap_.begin(), heap_.end(), lower_priority);
            const Item item = heap_.back();
            heap_.pop_back();
            out.tokens.push_back(item.token);
            out.parents.push_back(item.parent);
            out.probs.push_back(item.cond);
            push_children(item.node, static_cast<int32_t>(out.tokens.size()) - 1, item.p, cfg);
        }
    }

  private:
    struct Node {
        double weight = 0.0;    // summed weight of the candidates whose continuation passes here
        double p_weight = 0.0;  // of those, the weight of the ones that recorded the policy's probability
        double p_sum = 0.0;     // sum of weight x recorded probability
        int32_t token = -1;
        int32_t first_child = -1;
        int32_t last_child = -1;
        int32_t next_sibling = -1;
    };

    struct Item {
        double p;  // estimated path probability
        int64_t counter;
        int32_t token;
        int32_t parent;
        double cond;
        int32_t node;
    };

    // Python's heapq on (-p, counter): the highest p first, equal p in push order.
    static bool lower_priority(const Item& a, const Item& b) {
        return a.p < b.p || (a.p == b.p && a.counter > b.counter);
    }

    int32_t find_child(int32_t node, int32_t token) const {
        for (int32_t c = nodes_[node].first_child; c >= 0; c = nodes_[c].next_sibling) {
            if (nodes_[c].token == token) return c;
        }
        return -1;
    }

    int32_t add_child(int32_t node, int32_t token) {
        const int32_t index = static_cast<int32_t>(nodes_.size());
        Node child;
        child.token = token;
        nodes_.push_back(child);
        Node& parent = nodes_[node];
        if (parent.last_child < 0) {
            parent.first_child = index;
        } else {
            nodes_[parent.last_child].next_sibling = index;
        }
        parent.last_child = index;
        return index;
    }

    void push_children(int32_t node, int32_t index, double path_prob, const TreeConfig& cfg) {
        const double total = nodes_[node].weight + cfg.prior;
        for (int32_t c = nodes_[node].first_child; c >= 0; c = nodes_[c].next_sibling) {
            const Node& child = nodes_[c];
            double cond = child.weight / total;
            if (cfg.logprob_trust > 0 && child.p_weight > 0) {
                cond = (1 - cfg.logprob_trust) * cond + cfg.logprob_trust * child.p_sum / child.p_weight;
            }
            const double p = path_prob * cond;
            if (p >= cfg.min_prob) {
                heap_.push_back(Item{p, counter_++, child.token, index, cond, c});
                std::push_heap(heap_.begin(), heap_.end(), lower_priority);
            }
        }
    }

    std::vector<Node> nodes_;
    std::vector<Item> heap_;
    int64_t counter_ = 0;
};

// ------------------------------------------------------------------------------------------------ the global window

// A flat token array with hash chains: each indexable position is chained to the previous one with the same two
// preceding tokens (drafters/token_index.py, whose layout and hash this is, position for position).
class TokenIndex {
  public:
    struct Segment {
        int64_t start, first, end;  // the sequence's first token, first indexed position, end (its separator)
    };

    struct Piece {  // a sequence to build from: tokens, version, first indexed offset, float16 probabilities
        std::vector<int32_t> tokens;
        int16_t version;
        int64_t first_indexed;
        std::vector<uint16_t> probs;
    };

    TokenIndex(int bucket_bits, int64_t max_tokens)
        : bucket_bits_(bucket_bits), mask_((int64_t{1} << bucket_bits) - 1), max_tokens_(max_tokens) {
        clear();
    }

    void clear() {
        tokens_.assign(1, kSep);  // position 0 is a separator so every start has a left
        versions_.assign(1, 0);
        probs_.assign(1, float_to_half(kUnknown));
        prev_.assign(1, -1);
        head_.assign(size_t{1} << bucket_bits_, -1);
        segments_.clear();
        num_tokens_ = 0;
    }

    int64_t key(int32_t a, int32_t b) const {
        const int64_t h = static_cast<int64_t>(a) * 1000003 + static_cast<int64_t>(b) * 7919;
        return (h ^ (h >> 17)) & mask_;
    }

    // One sequence; positions from first_indexed on become continuation starts. probs: float32, may be null.
    void add(const int32_t* seq, int64_t n, int64_t version, int64_t first_indexed, const float* probs) {
        if (n == 0) return;
        if (num_tokens_ + n > max_tokens_) evict_oldest(num_tokens_ + n - max_tokens_);
        const int64_t start = static_cast<int64_t>(tokens_.size());
        const int16_t v = wrap16(version);
        tokens_.insert(tokens_.end(), seq, seq + n);
        tokens_.push_back(kSep);
        versions_.insert(versions_.end(), static_cast<size_t>(n + 1), v);
        for (int64_t i = 0; i < n; ++i) probs_.push_back(float_to_half(probs != nullptr ? probs[i] : kUnknown));
        probs_.push_back(float_to_half(kUnknown));
        prev_.insert(prev_.end(), static_cast<size_t>(n + 1), -1);
        link(start, std::max<int64_t>(first_indexed, 2), n);
    }

    // Replace the contents with these sequences (oldest first), keeping the newest that fit max_tokens.
    void build(std::vector<Piece>& pieces) {
        clear();
        if (pieces.empty()) return;
        size_t keep = pieces.size();
        int64_t total = 0;
        for (size_t i = pieces.size(); i-- > 0;) {
            total += static_cast<int64_t>(pieces[i].tokens.size()) + 1;
            if (total > max_tokens_) break;
            keep = i;
        }
        int64_t size = 1;
        for (size_t i = keep; i < pieces.size(); ++i) size += static_cast<int64_t>(pieces[i].tokens.size()) + 1;
        tokens_.reserve(size);
        versions_.reserve(size);
        probs_.reserve(size);
        prev_.reserve(size);
        segments_.reserve(pieces.size() - keep);
        for (size_t i = keep; i < pieces.size(); ++i) {
            Piece& piece = pieces[i];
            const int64_t n = static_cast<int64_t>(piece.tokens.size());
            const int64_t start = static_cast<int64_t>(tokens_.size());
            tokens_.insert(tokens_.end(), piece.tokens.begin(), piece.tokens.end());
            tokens_.push_back(kSep);
            versions_.insert(versions_.end(), static_cast<size_t>(n + 1), piece.version);
            probs_.insert(probs_.end(), piece.probs.begin(), piece.probs.end());
            probs_.push_back(float_to_half(kUnknown));
            prev_.insert(prev_.end(), static_cast<size_t>(n + 1), -1);
            // Chaining in position order gives the chains a sorted rebuild gives (newest first per bucket).
            link(start, std::max<int64_t>(piece.first_indexed, 2), n);
        }
    }

    // Drop whole sequences, oldest first, until at least num_tokens are freed; rebuilds the index.
    void evict_oldest(int64_t num_tokens) {
        int64_t freed = 0;
        size_t cut = 0;
        while (cut < segments_.size() && freed < num_tokens) {
            freed += segments_[cut].end - segments_[cut].start + 1;
            ++cut;
        }
        std::vector<Piece> kept;
        kept.reserve(segments_.size() - cut);
        for (size_t i = cut; i < segments_.size(); ++i) {
            const Segment& s = segments_[i];
            kept.push_back(Piece{std::vector<int32_t>(tokens_.begin() + s.start, tokens_.begin() + s.end),
                                 versions_[s.start], s.first - s.start,
                                 std::vector<uint16_t>(probs_.begin() + s.start, probs_.begin() + s.end)});
        }
        build(kept);
    }

    // Positions following the context's tail (newest first, at most max_walk walked), their match lengths and
    // stored versions; bucket collisions show up as matches shorter than two and are dropped.
    template <typename Emit>
    void query(const int32_t* context, int64_t n_context, int min_match, int max_match, int max_walk,
               Emit&& emit) const {
        if (n_context < 2 || tokens_.size() <= 1) return;
        int32_t p = head_[key(context[n_context - 2], context[n_context - 1])];
        const int limit = static_cast<int>(std::min<int64_t>(max_match, n_context));
        const int least = std::max(min_match, 2);
        for (int walked = 0; p >= 0 && walked < max_walk; ++walked) {
            const int len = match_length(tokens_.data(), p, context, n_context, limit);
            if (len >= least) emit(static_cast<int64_t>(p), len, versions_[p]);
            p = prev_[p];
        }
    }

    int64_t num_tokens() const { return num_tokens_; }

    size_t nbytes() const {
        return tokens_.capacity() * sizeof(int32_t) + versions_.capacity() * sizeof(int16_t) +
               probs_.capacity() * sizeof(uint16_t) + prev_.capacity() * sizeof(int32_t) +
               head_.capacity() * sizeof(int32_t);
    }

    // Every indexable position sits exactly once in its bucket's chain; chains run newest to oldest.
    void check_integrity() const {
        if (tokens_.size() != prev_.size() || tokens_.size() != versions_.size() || tokens_.size() != probs_.size())
            throw std::logic_error("token index arrays differ in length");
        std::vector<char> expected(tokens_.size(), 0), seen(tokens_.size(), 0);
        int64_t counted = 0;
        for (size_t i = 0; i < segments_.size(); ++i) {
            const Segment& s = segments_[i];
            if (!(s.start <= s.first) || tokens_[s.end] != kSep) throw std::logic_error("bad segment");
            if (i + 1 < segments_.size() && !(s.end < segments_[i + 1].start)) throw std::logic_error("bad segment");
            counted += s.end - s.start;
            for (int64_t p = s.first; p < s.end; ++p) expected[p] = 1;
        }
        if (counted != num_tokens_) throw std::logic_error("token count differs from the segments");
        for (size_t bucket = 0; bucket < head_.size(); ++bucket) {
            int64_t last = -1;
            for (int64_t p = head_[bucket]; p >= 0; p = prev_[p]) {
                if (seen[p]) throw std::logic_error("a position is chained twice");
                if (last >= 0 && !(p < last)) throw std::logic_error("chains must run from newest to oldest");
                if (key(tokens_[p - 2], tokens_[p - 1]) != static_cast<int64_t>(bucket))
                    throw std::logic_error("a position is chained under the wrong bucket");
                seen[p] = 1;
                last = p;
            }
        }
        if (seen != expected) throw std::logic_error("indexed positions differ from the segments");
    }

    std::vector<int32_t> tokens_;
    std::vector<int16_t> versions_;  // policy version mod 2^16 (wrap16)
    std::vector<uint16_t> probs_;    // float16 bits
    std::vector<int32_t> prev_;
    std::vector<int32_t> head_;
    std::vector<Segment> segments_;

  private:
    void link(int64_t start, int64_t first_offset, int64_t n) {
        const int64_t first = start + first_offset, end = start + n;
        segments_.push_back(Segment{start, first, end});
        num_tokens_ += n;
        for (int64_t p = first; p < end; ++p) {
            const int64_t k = key(tokens_[p - 2], tokens_[p - 1]);
            prev_[p] = head_[k];
            head_[k] = static_cast<int32_t>(p);
        }
    }

    int bucket_bits_;
    int64_t mask_;
    int64_t max_tokens_;
    int64_t num_tokens_ = 0;
};

// ------------------------------------------------------------------------------------------------ one prompt's past

// Finished rollouts of one prompt (at most max_rollouts, oldest dropped first), laid end to end per policy version:
// each as the last `tail` prompt tokens, its output and a separator; continuations start only inside outputs.
class PromptStore {
  public:
    struct Segment {
        int64_t allowed_from, end;  // continuation starts [allowed_from, end) of one rollout, in its version's array
    };

    struct Flat {
        int64_t version;
        std::vector<int32_t> tokens;
        std::vector<float> probs;
        std::vector<Segment> segments;
    };

    PromptStore(int max_rollouts, int tail) : max_rollouts_(max_rollouts), tail_(tail) {}

    // A finished rollout: prompt + output tokens [n], the policy's probability of each (NaN: unknown).
    void append(const int32_t* tokens, const float* probs, int64_t n, int64_t prompt_len, int64_t version) {
        if (max_rollouts_ <= 0) return;
        const int64_t lo = prompt_len - std::min<int64_t>(tail_, prompt_len);
        const Entry entry{version, n - lo, prompt_len - lo};
        if (static_cast<int>(rollouts_.size()) == max_rollouts_) evict_front();
        rollouts_.push_back(entry);
        if (entry.length > entry.skip) {
            Flat& flat = flat_of(version, true);
            const int64_t start = static_cast<int64_t>(flat.tokens.size());
            flat.tokens.insert(flat.tokens.end(), tokens + lo, tokens + n);
            flat.tokens.push_back(kSep);
            flat.probs.insert(flat.probs.end(), probs + lo, probs + n);
            flat.probs.push_back(kUnknown);
            flat.segments.push_back(Segment{start + entry.skip, start + entry.length});
        }
        reorder();
    }

    // The version arrays in scan order: by the oldest kept rollout of each version.
    const std::vector<int32_t>& order() const { return order_; }
    const std::vector<Flat>& flats() const { return flats_; }

    void shrink() {
        for (Flat& f : flats_) {
            f.tokens.shrink_to_fit();
            f.probs.shrink_to_fit();
            f.segments.shrink_to_fit();
        }
    }

    size_t nbytes() const {
        size_t total = 0;
        for (const Flat& f : flats_) {
            total += f.tokens.capacity() * sizeof(int32_t) + f.probs.capacity() * sizeof(float) +
                     f.segments.capacity() * sizeof(Segment);
        }
        return total;
    }

  private:
    struct Entry {
        int64_t version, length, skip;  // tokens kept (prompt tail + output), of which prompt tail
    };

    Flat& flat_of(int64_t version, bool create) {
        for (Flat& f : flats_) {
            if (f.version == version) return f;
        }
        if (!create) throw std::logic_error("prompt store: version without an array");
        flats_.push_back(Flat{version, {}, {}, {}});
        return flats_.back();
    }

    // The oldest rollout is the first of its version's array (rollouts of a version are appended in order).
    void evict_front() {
        const Entry e = rollouts_.front();
        rollouts_.pop_front();
        if (e.length <= e.skip) return;
        Flat& flat = flat_of(e.version, false);
        const int64_t cut = e.length + 1;
        flat.tokens.erase(flat.tokens.begin(), flat.tokens.begin() + cut);
        flat.probs.erase(flat.probs.begin(), flat.probs.begin() + cut);
        flat.segments.erase(flat.segments.begin());
        for (Segment& s : flat.segments) {
            s.allowed_from -= cut;
            s.end -= cut;
        }
        if (flat.segments.empty()) {
            flats_.erase(std::find_if(flats_.begin(), flats_.end(),
                                      [&](const Flat& f) { return f.version == e.version; }));
        }
    }

    void reorder() {
        order_.clear();
        for (const Entry& e : rollouts_) {
            if (e.length <= e.skip) continue;
            for (int32_t i = 0; i < static_cast<int32_t>(flats_.size()); ++i) {
                if (flats_[i].version == e.version) {
                    if (std::find(order_.begin(), order_.end(), i) == order_.end()) order_.push_back(i);
                    break;
                }
            }
        }
    }

    int max_rollouts_;
    int tail_;
    std::deque<Entry> rollouts_;
    std::vector<Flat> flats_;
    std::vector<int32_t> order_;
};

// ------------------------------------------------------------------------------------------------ the drafter

class SuffixCore {
  public:
    explicit SuffixCore(const SuffixConfig& cfg)
        : cfg_(cfg), global_(cfg.bucket_bits, cfg.global_max_tokens) {
        power_.resize(static_cast<size_t>(cfg.tree.max_match) + 1);
        for (int len = 0; len <= cfg.tree.max_match; ++len) {
            power_[len] = std::pow(static_cast<double>(len), cfg.tree.match_power);  // Python's float ** float
        }
    }

    // ---------------------------------------------------------------- lifecycle

    int32_t begin(const int32_t* prompt, int64_t n, const std::string& group, const std::string& key) {
        check_tokens(prompt, n, "prompt");
        const int32_t slot = requests_.acquire();
        Request& r = requests_[slot];
        r.tokens.assign(prompt, prompt + n);
        r.probs.assign(static_cast<size_t>(n), kUnknown);
        r.prompt_len = n;
        r.group = group;
        r.key = key;
        r.alive = true;
        auto it = groups_.find(group);
        if (it == groups_.end()) it = groups_.emplace(group, Group{next_group_id_++, {}}).first;
        it->second.members.push_back(slot);
        r.group_id = it->second.id;
        ++live_;
        return slot;
    }

    // Emitted tokens [n] of one request and the policy's probability of each (null: unknown).
    void observe(int32_t slot, const int32_t* tokens, const float* probs, int64_t n) {
        if (n == 0) return;
        check_tokens(tokens, n, "observed token");
        Request& r = live(slot);
        const int64_t start = static_cast<int64_t>(r.tokens.size());
        r.tokens.insert(r.tokens.end(), tokens, tokens + n);
        if (probs != nullptr) {
            r.probs.insert(r.probs.end(), probs, probs + n);
        } else {
            r.probs.insert(r.probs.end(), static_cast<size_t>(n), kUnknown);
        }
        const int64_t size = static_cast<int64_t>(r.tokens.size());
        const int32_t* d = r.tokens.data();
        for (int64_t p = std::max<int64_t>({start, r.prompt_len, 3}); p < size; ++p) {
            inflight_[Key3{d[p - 3], d[p - 2], d[p - 1]}].emplace_back(slot, static_cast<int32_t>(p));
        }
    }

    void end(int32_t slot) {
        Request& r = live(slot);
        r.alive = false;
        --live_;
        auto it = groups_.find(r.group);
        std::vector<int32_t>& members = it->second.members;
        members.erase(std::find(members.begin(), members.end(), slot));
        if (members.empty()) groups_.erase(it);
        const int64_t n = static_cast<int64_t>(r.tokens.size());
        if (n > r.prompt_len) remember(r.key, r.tokens.data(), r.probs.data(), n, r.prompt_len, version_);
        std::vector<int32_t>().swap(r.tokens);
        std::vector<float>().swap(r.probs);
        // The slot's in-flight entries are skipped from now on and dropped at the next sweep; only then can the
        // slot serve another request. Sweeping early changes no draft, so a long run without refreshes sweeps too.
        ended_.push_back(slot);
        if (ended_.size() > std::max<size_t>(4096, 2 * static_cast<size_t>(live_))) sweep();
    }

    // A new policy version without a history: what rollouts end from now on are stored as.
    void set_version(int64_t version) {
        version_ = version;
        sweep();
    }

    // Rebuild the per-prompt stores and the global window from rows of a history (each row: prompt key, version,
    // prompt and output tokens, the output tokens' logprobs, NaN = unknown), in the history's order.
    void refresh(int64_t version, const std::vector<std::string>& keys, const int64_t* versions,
                 const int32_t* prompts, const int64_t* prompt_offsets, const int32_t* outputs,
                 const int64_t* output_offsets, const float* output_logprobs) {
        set_version(version);
        stores_.clear();
        std::vector<TokenIndex::Piece> pieces;
        std::vector<int32_t> tokens;
        std::vector<float> probs;
        for (size_t row = 0; row < keys.size(); ++row) {
            const int64_t p0 = prompt_offsets[row], p1 = prompt_offsets[row + 1];
            const int64_t o0 = output_offsets[row], o1 = output_offsets[row + 1];
            if (o1 == o0) continue;
            const int64_t prompt_len = p1 - p0;
            tokens.assign(prompts + p0, prompts + p1);
            tokens.insert(tokens.end(), outputs + o0, outputs + o1);
            probs.assign(static_cast<size_t>(prompt_len), kUnknown);
            for (int64_t i = o0; i < o1; ++i) probs.push_back(token_prob(output_logprobs[i]));
            const int64_t n = static_cast<int64_t>(tokens.size());
            store(keys[row]).append(tokens.data(), probs.data(), n, prompt_len, versions[row]);
            const int64_t tail = std::min<int64_t>(cfg_.prompt_tail, prompt_len);
            const int64_t lo = prompt_len - tail;
            TokenIndex::Piece piece{std::vector<int32_t>(tokens.begin() + lo, tokens.end()), wrap16(versions[row]),
                                    tail, {}};
            piece.probs.reserve(static_cast<size_t>(n - lo));
            for (int64_t i = lo; i < n; ++i) piece.probs.push_back(float_to_half(probs[i]));
            pieces.push_back(std::move(piece));
        }
        global_.build(pieces);
        for (auto& kv : stores_) kv.second.shrink();
    }

    // Drop ended requests' in-flight entries; their slots become free.
    void sweep() {
        if (ended_.empty()) return;
        for (auto it = inflight_.begin(); it != inflight_.end();) {
            auto& entries = it->second;
            entries.erase(std::remove_if(entries.begin(), entries.end(),
                                         [&](const std::pair<int32_t, int32_t>& e) {
                                             return !requests_[e.first].alive;
                                         }),
                          entries.end());
            it = entries.empty() ? inflight_.erase(it) : std::next(it);
        }
        for (int32_t slot : ended_) requests_.release(slot);
        ended_.clear();
    }

    // ---------------------------------------------------------------- drafting

    void propose(int32_t slot, int max_tokens, DraftOut& out) {
        out.clear();
        if (max_tokens <= 0) return;
        const Request& r = live(slot);
        const int32_t* ctx = r.tokens.data();
        const int64_t n_ctx = static_cast<int64_t>(r.tokens.size());
        sources_.clear();
        top_.reset(static_cast<size_t>(cfg_.tree.max_candidates));
        const int limit = static_cast<int>(std::min<int64_t>(cfg_.tree.max_match, n_ctx));

        // The group: siblings in flight, then finished rollouts of this prompt (their own prompts are skipped:
        // the request's own prompt already covers them).
        for (int32_t sid : groups_.find(r.group)->second.members) {
            if (sid == slot) continue;
            const Request& sib = requests_[sid];
            scan(sib.tokens.data(), sib.probs.data(), static_cast<int64_t>(sib.tokens.size()), sib.prompt_len,
                 cfg_.min_match_group, cfg_.group_weight, ctx, n_ctx, limit);
        }
        auto store = stores_.find(r.key);
        if (store != stores_.end()) {
            for (int32_t i : store->second.order()) {
                const PromptStore::Flat& flat = store->second.flats()[i];
                scan_segments(flat, cfg_.group_weight * recency(flat.version), ctx, n_ctx, limit);
            }
        }
        // The request itself: prompt lookup and repetition.
        scan(ctx, r.probs.data(), n_ctx, 1, cfg_.min_match_self, cfg_.self_weight, ctx, n_ctx, limit);
        // Other groups in flight, newest first.
        if (n_ctx >= 3) {
            auto found = inflight_.find(Key3{ctx[n_ctx - 3], ctx[n_ctx - 2], ctx[n_ctx - 1]});
            if (found != inflight_.end()) {
                const int width = static_cast<int>(std::min<int64_t>(cfg_.tree.max_match, n_ctx));
                int picked = 0;
                const auto& entries = found->second;
                for (auto e = entries.rbegin(); e != entries.rend(); ++e) {
                    const Request& other = requests_[e->first];
                    if (!other.alive || other.group_id == r.group_id) continue;
                    const int len = match_length(other.tokens.data(), e->second, ctx, n_ctx, width);
                    if (len >= cfg_.min_match_global) {
                        top_.offer(static_cast<int32_t>(sources_.size()), len, e->second, weight_of(cfg_.global_weight, len));
                        sources_.push_back(Source{other.tokens.data(), other.probs.data(), nullptr,
                                                  static_cast<int64_t>(other.tokens.size()), cfg_.global_weight});
                    }
                    if (++picked == cfg_.max_walk) break;
                }
            }
        }
        // The global window: one source per recency value, ascending; within it newest first.
        hits_.clear();
        global_.query(ctx, n_ctx, cfg_.min_match_global, cfg_.tree.max_match, cfg_.max_walk,
                      [&](int64_t start, int len, int16_t version) {
                          hits_.push_back(GlobalHit{start, len, decay_pow(age16(version_, version))});
                      });
        if (!hits_.empty()) {
            recencies_.clear();
            for (const GlobalHit& h : hits_) recencies_.push_back(h.recency);
            std::sort(recencies_.begin(), recencies_.end());
            recencies_.erase(std::unique(recencies_.begin(), recencies_.end()), recencies_.end());
            for (double value : recencies_) {
                const int32_t src = static_cast<int32_t>(sources_.size());
                const double weight = cfg_.global_weight * value;
                sources_.push_back(Source{global_.tokens_.data(), nullptr, global_.probs_.data(),
                                          static_cast<int64_t>(global_.tokens_.size()), weight});
                for (const GlobalHit& h : hits_) {
                    if (h.recency == value) top_.offer(src, h.len, h.start, weight_of(weight, h.len));
                }
            }
        }
        tree_.build(sources_, top_.ranked(), max_tokens, cfg_.tree, out);
    }

    // ---------------------------------------------------------------- introspection

    size_t nbytes() const {
        size_t total = global_.nbytes();
        for (const auto& kv : stores_) total += kv.second.nbytes();
        return total;
    }

    void check_integrity() const {
        global_.check_integrity();
        int64_t members = 0;
        for (const auto& kv : groups_) {
            if (kv.second.members.empty()) throw std::logic_error("group " + kv.first + " is empty but kept");
            for (int32_t slot : kv.second.members) {
                if (!requests_.contains(slot)) throw std::logic_error("group " + kv.first + " lists no slot");
                const Request& r = requests_[slot];
                if (!r.alive || r.group != kv.first || r.group_id != kv.second.id)
                    throw std::logic_error("group " + kv.first + " lists a request that is not its member");
                if (r.prompt_len > static_cast<int64_t>(r.tokens.size())) throw std::logic_error("prompt too long");
            }
            members += static_cast<int64_t>(kv.second.members.size());
        }
        if (members != live_) throw std::logic_error("live requests and group members differ");
    }

    static void check_tokens(const int32_t* tokens, int64_t n, const char* what) {
        for (int64_t i = 0; i < n; ++i) {
            if (tokens[i] < 0) {
                throw std::invalid_argument(std::string("suffix drafter: ") + what + " ids must be >= 0, got " +
                                            std::to_string(tokens[i]));
            }
        }
    }

    void check_live(int32_t slot) const {
        if (!requests_.contains(slot) || !requests_[slot].alive) {
            throw std::out_of_range("suffix drafter: no request in flight in slot " + std::to_string(slot));
        }
    }

    int64_t live_requests() const { return live_; }
    const TokenIndex& global_index() const { return global_; }

  private:
    struct Request {
        std::vector<int32_t> tokens;
        std::vector<float> probs;
        int64_t prompt_len = 0;
        std::string group;
        int64_t group_id = -1;
        std::string key;
        bool alive = false;
    };

    struct Group {
        int64_t id;  // never reused: an ended request's stale group id matches no live group
        std::vector<int32_t> members;  // in the order they began
    };

    struct Key3 {
        int32_t a, b, c;
        bool operator==(const Key3& o) const { return a == o.a && b == o.b && c == o.c; }
    };

    struct Key3Hash {
        size_t operator()(const Key3& k) const noexcept {
            uint64_t h = static_cast<uint32_t>(k.a) * 0x9E3779B97F4A7C15ull;
            h ^= static_cast<uint32_t>(k.b) + 0x632BE59BD9B4E019ull + (h << 6) + (h >> 2);
            h ^= static_cast<uint32_t>(k.c) + 0x85EBCA77C2B2AE63ull + (h << 6) + (h >> 2);
            return static_cast<size_t>(h ^ (h >> 29));
        }
    };

    struct GlobalHit {
        int64_t start;
        int len;
        double recency;
    };

    Request& live(int32_t slot) {
        check_live(slot);
        return requests_[slot];
    }

    // decay ** age by the C library's pow, as Python's float pow computes it; memoised per age (a handful of ages
    // recur at every step, and pow was a tenth of a draft's cost).
    double decay_pow(int64_t age) {
        age = std::max<int64_t>(0, age);
        if (age >= static_cast<int64_t>(recency_by_age_.size())) {
            if (age >= 4096) return std::pow(cfg_.decay, static_cast<double>(age));
            recency_by_age_.resize(static_cast<size_t>(age) + 1, -1.0);
        }
        double& r = recency_by_age_[static_cast<size_t>(age)];
        if (r < 0) r = std::pow(cfg_.decay, static_cast<double>(age));
        return r;
    }

    double recency(int64_t version) { return decay_pow(version_ - version); }

    PromptStore& store(const std::string& key) {
        auto it = stores_.find(key);
        if (it == stores_.end()) {
            it = stores_.emplace(key, PromptStore(cfg_.max_rollouts_per_prompt, cfg_.tree.max_match)).first;
        }
        return it->second;
    }

    void remember(const std::string& key, const int32_t* tokens, const float* probs, int64_t n, int64_t prompt_len,
                  int64_t version) {
        store(key).append(tokens, probs, n, prompt_len, version);
        const int64_t tail = std::min<int64_t>(cfg_.prompt_tail, prompt_len);
        const int64_t lo = prompt_len - tail;
        global_.add(tokens + lo, n - lo, version, tail, probs + lo);
    }

    // A match's weight: its source's weight x match_len ** match_power (drafters/matching.py: match_weights).
    double weight_of(double source_weight, int match_len) const {
        return source_weight * power_[std::min(match_len, cfg_.tree.max_match)];
    }

    // Starts s in [max(min_start, 1), n) whose preceding tokens match the context's tail by >= min_match tokens.
    void scan(const int32_t* array, const float* probs, int64_t n, int64_t min_start, int min_match, double weight,
              const int32_t* ctx, int64_t n_ctx, int limit) {
        const int64_t lo = std::max<int64_t>(min_start, 1);
        if (n - lo <= 0 || n_ctx == 0 || !top_.could_keep(weight_of(weight, limit))) return;
        const int32_t src = static_cast<int32_t>(sources_.size());
        sources_.push_back(Source{array, probs, nullptr, n, weight});
        for_each_equal(array, lo - 1, n - 1, ctx[n_ctx - 1], [&](int64_t i) {
            const int len = match_length(array, i + 1, ctx, n_ctx, limit);
            if (len >= min_match) top_.offer(src, len, i + 1, weight_of(weight, len));
        });
    }

    void scan_segments(const PromptStore::Flat& flat, double weight, const int32_t* ctx, int64_t n_ctx, int limit) {
        const int64_t n = static_cast<int64_t>(flat.tokens.size());
        if (n - 1 <= 0 || n_ctx == 0 || !top_.could_keep(weight_of(weight, limit))) return;
        const int32_t src = static_cast<int32_t>(sources_.size());
        const int32_t* array = flat.tokens.data();
        sources_.push_back(Source{array, flat.probs.data(), nullptr, n, weight});
        for (const PromptStore::Segment& seg : flat.segments) {
            for_each_equal(array, std::max<int64_t>(seg.allowed_from, 1) - 1, seg.end - 1, ctx[n_ctx - 1], [&](int64_t i) {
                const int len = match_length(array, i + 1, ctx, n_ctx, limit);
                if (len >= cfg_.min_match_group) top_.offer(src, len, i + 1, weight_of(weight, len));
            });
        }
    }

    SuffixConfig cfg_;
    std::vector<double> power_;  // power_[len] = len ** match_power
    int64_t version_ = 0;
    Slots<Request> requests_;
    std::vector<int32_t> ended_;  // slots ended since the last sweep, released by it
    int64_t live_ = 0;
    std::unordered_map<std::string, Group> groups_;
    int64_t next_group_id_ = 0;
    std::unordered_map<Key3, std::vector<std::pair<int32_t, int32_t>>, Key3Hash> inflight_;
    std::unordered_map<std::string, PromptStore> stores_;
    TokenIndex global_;

    // scratch, reused from step to step
    std::vector<Source> sources_;
    TopCandidates top_;
    std::vector<GlobalHit> hits_;
    std::vector<double> recencies_;
    std::vector<double> recency_by_age_;  // decay ** age; -1 = not computed yet
    TreeBuilder tree_;
};

}  // namespace specrollout
