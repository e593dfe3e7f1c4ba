// Placeholder: module PVSCSI is being built.
