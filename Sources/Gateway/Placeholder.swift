// Placeholder: module Gateway is being built.
