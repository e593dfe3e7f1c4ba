// Placeholder: module VhostUser is being built.
