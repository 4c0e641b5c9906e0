"""Run-time side: the reference executor and the artifact runtime (`session.load`: one loader per
target, none of which imports the compiler), plus bench and the roofline model."""
