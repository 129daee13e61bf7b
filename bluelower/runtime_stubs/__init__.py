"""runtime_stubs"""
