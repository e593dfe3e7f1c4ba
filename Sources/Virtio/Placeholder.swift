// Placeholder: module Virtio is being built.
