// Placeholder: module VfioUser is being built.
