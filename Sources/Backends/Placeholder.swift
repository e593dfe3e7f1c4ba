// Placeholder: module Backends is being built.
