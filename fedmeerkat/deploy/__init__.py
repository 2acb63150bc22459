"""Real deployment on NVIDIA FLARE 2.9: a transport that moves opaque bytes.

    provision.provision(workspace, project, sites, host, fl_port, admin_port) -> Kits
        signed startup kits, mutual TLS; FLARE logging at WARNING (log_level=... to change)
    processes.running(kits) -> {name: Popen}       server + sites as local processes, always stopped
    admin.session(kits), admin.wait_for_sites(s, sites), admin.run_job(s, job_dir, download_to)
    job.make_job(name, {site: site_arg}, driver="pkg.mod:fn", handler="pkg.mod:factory", ...)

Server: `fn(transport, **driver_args)` runs the job; `transport.exchange(round, {site: bytes},
timeout_s) -> {site: bytes}` (transport.Transport). Site: one resident process per site calls
`factory(site, site_arg)` once and answers each payload with the returned `bytes -> bytes`.
echo.py is the test load; selftest.py runs it all end to end in private namespaces.
Nothing else in fedmeerkat imports this package (it needs nvflare).
"""
