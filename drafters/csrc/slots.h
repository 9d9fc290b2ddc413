// Per-request state of a compiled drafter, in one vector indexed by slot; a released slot serves the next request.
#pragma once

#include <cstdint>
#include <vector>

namespace specrollout {

template <typename T>
class Slots {
  public:
    int32_t acquire() {
        if (!free_.empty()) {
            const int32_t slot = free_.back();
            free_.pop_back();
            return slot;
        }
        items_.emplace_back();
        return static_cast<int32_t>(items_.size()) - 1;
    }

    void release(int32_t slot) { free_.push_back(slot); }

    bool contains(int32_t slot) const { return slot >= 0 && slot < static_cast<int32_t>(items_.size()); }
    T& operator[](int32_t slot) { return items_[static_cast<size_t>(slot)]; }
    const T& operator[](int32_t slot) const { return items_[static_cast<size_t>(slot)]; }

  private:
    std::vector<T> items_;
    std::vector<int32_t> free_;
};

}  // namespace specrollout
