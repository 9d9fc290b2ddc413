// Python bindings of the compiled drafter cores (drafters/_native). One call per engine step for the whole batch:
// the per-request work and the per-candidate work stay in C++, and what crosses into Python is one Draft per
// sequence. The GIL is held throughout: a drafter is called from one engine loop, and holding it keeps a core safe
// from a second Python thread without a lock of its own.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <string>
#include <vector>

#include "half.h"
#include "ngram_core.h"
#include "suffix_core.h"

namespace py = pybind11;
using specrollout::DraftOut;

namespace {

using IntArray = py::array_t<int32_t, py::array::c_style | py::array::forcecast>;
using LongArray = py::array_t<int64_t, py::array::c_style | py::array::forcecast>;
using FloatArray = py::array_t<float, py::array::c_style | py::array::forcecast>;

template <typename T>
py::list to_list(const std::vector<T>& values) {
    PyObject* list = PyList_New(static_cast<Py_ssize_t>(values.size()));
    if (list == nullptr) throw py::error_already_set();
    for (size_t i = 0; i < values.size(); ++i) {
        PyObject* item;
        if constexpr (std::is_floating_point_v<T>) {
            item = PyFloat_FromDouble(static_cast<double>(values[i]));
        } else {
            item = PyLong_FromLongLong(static_cast<long long>(values[i]));
        }
        if (item == nullptr) {
            Py_DECREF(list);
            throw py::error_already_set();
        }
        PyList_SET_ITEM(list, static_cast<Py_ssize_t>(i), item);
    }
    return py::reinterpret_steal<py::list>(list);
}

template <typename T>
T get(const py::dict& d, const char* name) {
    if (!d.contains(name)) throw py::key_error(std::string("suffix core config lacks '") + name + "'");
    return d[name].cast<T>();
}

specrollout::SuffixConfig config_from(const py::dict& d) {
    specrollout::SuffixConfig c;
    c.decay = get<double>(d, "decay");
    c.group_weight = get<double>(d, "group_weight");
    c.self_weight = get<double>(d, "self_weight");
    c.global_weight = get<double>(d, "global_weight");
    c.min_match_group = get<int>(d, "min_match_group");
    c.min_match_self = get<int>(d, "min_match_self");
    c.min_match_global = get<int>(d, "min_match_global");
    c.max_rollouts_per_prompt = get<int>(d, "max_rollouts_per_prompt");
    c.global_max_tokens = get<int64_t>(d, "global_max_tokens");
    c.prompt_tail = get<int>(d, "prompt_tail");
    c.max_walk = get<int>(d, "max_walk");
    c.bucket_bits = get<int>(d, "bucket_bits");
    c.tree.max_candidates = get<int>(d, "max_candidates");
    c.tree.match_power = get<double>(d, "match_power");
    c.tree.max_match = get<int>(d, "max_match");
    c.tree.prior = get<double>(d, "prior");
    c.tree.min_prob = get<double>(d, "min_prob");
    c.tree.max_depth = get<int>(d, "max_depth");
    c.tree.logprob_trust = get<double>(d, "logprob_trust");
    return c;
}

void check_batch(size_t a, size_t b, const char* what) {
    if (a != b) {
        throw std::invalid_argument(std::string(what) + ": " + std::to_string(a) + " requests but " +
                                    std::to_string(b) + " values");
    }
}

class Observed {
  public:
    void read(const std::vector<int32_t>& slots, py::handle tokens, py::handle logprobs, bool with_probs) {
        tokens_.clear();
        probs_.clear();
        offsets_.assign(1, 0);
        has_probs_.clear();
        const py::sequence rows = py::reinterpret_borrow<py::sequence>(tokens);
        if (static_cast<size_t>(py::len(rows)) != slots.size()) {
            throw std::invalid_argument("observe: " + std::to_string(slots.size()) + " requests but " +
                                        std::to_string(py::len(rows)) + " token lists");
        }
        const bool any_logprobs = with_probs && !logprobs.is_none();
        py::sequence lp_rows;
        if (any_logprobs) {
            lp_rows = py::reinterpret_borrow<py::sequence>(logprobs);
            if (py::len(lp_rows) != py::len(rows)) throw std::invalid_argument("observe: logprobs and tokens differ");
        }
        for (size_t i = 0; i < slots.size(); ++i) {
            const py::sequence row = py::reinterpret_borrow<py::sequence>(rows[i]);
            const size_t n = py::len(row);
            for (size_t j = 0; j < n; ++j) {
                const long long v = PyLong_AsLongLong(row[j].ptr());
                if (v == -1 && PyErr_Occurred()) throw py::error_already_set();
                if (v < INT32_MIN || v > INT32_MAX) throw std::invalid_argument("observe: token id out of range");
                tokens_.push_back(static_cast<int32_t>(v));
            }
            offsets_.push_back(tokens_.size());
            bool known = false;
            if (any_logprobs) {
                const py::handle lp = lp_rows[i];
                if (!lp.is_none()) {
                    const py::sequence lp_row = py::reinterpret_borrow<py::sequence>(lp);
                    known = static_cast<size_t>(py::len(lp_row)) == n;  // one per token, or none count
                    for (size_t j = 0; known && j < n; ++j) {
                        const double x = PyFloat_AsDouble(lp_row[j].ptr());
                        if (x == -1.0 && PyErr_Occurred()) throw py::error_already_set();
                        probs_.push_back(specrollout::token_prob(x));
                    }
                }
            }
            if (with_probs && !known) probs_.insert(probs_.end(), n, specrollout::kUnknown);
            has_probs_.push_back(known);
        }
    }

    const int32_t* tokens(size_t i) const { return tokens_.data() + offsets_[i]; }
    const float* probs(size_t i) const { return has_probs_[i] ? probs_.data() + offsets_[i] : nullptr; }
    int64_t count(size_t i) const { return static_cast<int64_t>(offsets_[i + 1] - offsets_[i]); }

  private:
    std::vector<int32_t> tokens_;
    std::vector<float> probs_;
    std::vector<size_t> offsets_;
    std::vector<char> has_probs_;
};

// Makes the project's Draft objects (drafters/base.py) from a core's output; an empty draft is the shared one.
class DraftFactory {
  public:
    DraftFactory(py::object draft_type, py::object empty) : type_(std::move(draft_type)), empty_(std::move(empty)) {}

    py::object tree(const DraftOut& d) const {
        return d.tokens.empty() ? empty_ : type_(to_list(d.tokens), to_list(d.parents), to_list(d.probs));
    }

    py::object chain(const std::vector<int32_t>& tokens) const { return tokens.empty() ? empty_ : type_(to_list(tokens)); }

  private:
    py::object type_;
    py::object empty_;
};

class PySuffixCore {
  public:
    PySuffixCore(const py::dict& config, py::object draft_type, py::object empty)
        : core_(config_from(config)), drafts_(std::move(draft_type), std::move(empty)) {}

    int32_t begin(const IntArray& prompt, const std::string& group, const std::string& key) {
        return core_.begin(prompt.data(), prompt.size(), group, key);
    }

    // tokens: one sequence of ids per slot; logprobs: None, or per slot None or one logprob per token.
    void observe(const std::vector<int32_t>& slots, py::handle tokens, py::handle logprobs) {
        observed_.read(slots, tokens, logprobs, true);
        for (size_t i = 0; i < slots.size(); ++i) {
            core_.check_live(slots[i]);
            core_.check_tokens(observed_.tokens(i), observed_.count(i), "observed token");
        }
        for (size_t i = 0; i < slots.size(); ++i) {
            core_.observe(slots[i], observed_.tokens(i), observed_.probs(i), observed_.count(i));
        }
    }

    void end(int32_t slot) { core_.end(slot); }

    void set_version(int64_t version) { core_.set_version(version); }

    void refresh(int64_t version, const std::vector<std::string>& keys, const LongArray& versions,
                 const IntArray& prompts, const LongArray& prompt_offsets, const IntArray& outputs,
                 const LongArray& output_offsets, const FloatArray& output_logprobs) {
        const auto rows = static_cast<py::ssize_t>(keys.size());
        if (versions.size() != rows || prompt_offsets.size() != rows + 1 || output_offsets.size() != rows + 1) {
            throw std::invalid_argument("refresh: keys, versions and offsets disagree on the number of rows");
        }
        if (output_logprobs.size() != outputs.size()) throw std::invalid_argument("refresh: logprobs and outputs differ");
        if (prompt_offsets.data()[rows] != prompts.size() || output_offsets.data()[rows] != outputs.size()) {
            throw std::invalid_argument("refresh: offsets do not end at the token arrays' ends");
        }
        core_.refresh(version, keys, versions.data(), prompts.data(), prompt_offsets.data(), outputs.data(),
                      output_offsets.data(), output_logprobs.data());
    }

    py::list propose(const std::vector<int32_t>& slots, const std::vector<int32_t>& max_tokens) {
        check_batch(slots.size(), max_tokens.size(), "propose");
        outs_.resize(std::max(outs_.size(), slots.size()));
        for (size_t i = 0; i < slots.size(); ++i) core_.propose(slots[i], max_tokens[i], outs_[i]);
        py::list drafts(slots.size());
        for (size_t i = 0; i < slots.size(); ++i) drafts[i] = drafts_.tree(outs_[i]);
        return drafts;
    }

    size_t nbytes() const { return core_.nbytes(); }
    void check_integrity() const { core_.check_integrity(); }
    int64_t live_requests() const { return core_.live_requests(); }

    // The global index's arrays, copied, for tests that hold them to the Python TokenIndex.
    py::dict global_state() const {
        const specrollout::TokenIndex& g = core_.global_index();
        py::dict out;
        out["tokens"] = py::array_t<int32_t>(g.tokens_.size(), g.tokens_.data());
        out["versions"] = py::array_t<int16_t>(g.versions_.size(), g.versions_.data());
        out["probs"] = py::array_t<uint16_t>(g.probs_.size(), g.probs_.data());
        out["prev"] = py::array_t<int32_t>(g.prev_.size(), g.prev_.data());
        out["head"] = py::array_t<int32_t>(g.head_.size(), g.head_.data());
        py::list segments;
        for (const auto& s : g.segments_) segments.append(py::make_tuple(s.start, s.first, s.end));
        out["segments"] = segments;
        return out;
    }

  private:
    specrollout::SuffixCore core_;
    DraftFactory drafts_;
    std::vector<DraftOut> outs_;
    Observed observed_;
};

class PyNgramCore {
  public:
    PyNgramCore(int min_n, int max_n, py::object draft_type, py::object empty)
        : core_(min_n, max_n), drafts_(std::move(draft_type), std::move(empty)) {}

    int32_t begin(const IntArray& prompt) { return core_.begin(prompt.data(), prompt.size()); }

    void observe(const std::vector<int32_t>& slots, py::handle tokens) {
        observed_.read(slots, tokens, py::none(), false);
        for (int32_t slot : slots) core_.check_live(slot);
        for (size_t i = 0; i < slots.size(); ++i) core_.observe(slots[i], observed_.tokens(i), observed_.count(i));
    }

    void end(int32_t slot) { core_.end(slot); }

    py::list propose(const std::vector<int32_t>& slots, const std::vector<int32_t>& max_tokens) {
        check_batch(slots.size(), max_tokens.size(), "propose");
        py::list drafts(slots.size());
        for (size_t i = 0; i < slots.size(); ++i) {
            core_.propose(slots[i], max_tokens[i], out_);
            drafts[i] = drafts_.chain(out_);
        }
        return drafts;
    }

  private:
    specrollout::NgramCore core_;
    DraftFactory drafts_;
    std::vector<int32_t> out_;
    Observed observed_;
};

}  // namespace

PYBIND11_MODULE(_native, m) {
    m.doc() = "Compiled drafter cores: the suffix drafter (drafters/suffix.py) and prompt lookup (drafters/ngram.py).";

    py::class_<PySuffixCore>(m, "SuffixCore")
        .def(py::init<const py::dict&, py::object, py::object>(), py::arg("config"), py::arg("draft_type"),
             py::arg("empty_draft"))
        .def("begin", &PySuffixCore::begin, py::arg("prompt"), py::arg("group"), py::arg("key"))
        .def("observe", &PySuffixCore::observe, py::arg("slots"), py::arg("tokens"), py::arg("logprobs"))
        .def("end", &PySuffixCore::end, py::arg("slot"))
        .def("set_version", &PySuffixCore::set_version, py::arg("version"))
        .def("refresh", &PySuffixCore::refresh, py::arg("version"), py::arg("keys"), py::arg("versions"),
             py::arg("prompts"), py::arg("prompt_offsets"), py::arg("outputs"), py::arg("output_offsets"),
             py::arg("output_logprobs"))
        .def("propose", &PySuffixCore::propose, py::arg("slots"), py::arg("max_tokens"))
        .def_property_readonly("nbytes", &PySuffixCore::nbytes)
        .def_property_readonly("live_requests", &PySuffixCore::live_requests)
        .def("check_integrity", &PySuffixCore::check_integrity)
        .def("global_state", &PySuffixCore::global_state);

    py::class_<PyNgramCore>(m, "NgramCore")
        .def(py::init<int, int, py::object, py::object>(), py::arg("min_n"), py::arg("max_n"), py::arg("draft_type"),
             py::arg("empty_draft"))
        .def("begin", &PyNgramCore::begin, py::arg("prompt"))
        .def("observe", &PyNgramCore::observe, py::arg("slots"), py::arg("tokens"))
        .def("end", &PyNgramCore::end, py::arg("slot"))
        .def("propose", &PyNgramCore::propose, py::arg("slots"), py::arg("max_tokens"));

    m.def(
        "float_to_half",
        [](const FloatArray& values) {
            py::array_t<uint16_t> out(values.size());
            for (py::ssize_t i = 0; i < values.size(); ++i) out.mutable_data()[i] = specrollout::float_to_half(values.data()[i]);
            return out;
        },
        "float32 -> float16 bits, as the global index rounds (tests hold it to numpy's cast)");
    m.def(
        "ngram_lookup",
        [](const IntArray& tokens, int max_tokens, int min_n, int max_n) {
            std::vector<int32_t> out;
            specrollout::ngram_lookup(tokens.data(), tokens.size(), max_tokens, min_n, max_n, out);
            return out;
        },
        py::arg("tokens"), py::arg("max_tokens"), py::arg("min_n"), py::arg("max_n"));
}
