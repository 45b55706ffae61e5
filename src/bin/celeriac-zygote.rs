//! `celeriac-zygote`: the one celeriac process that embeds CPython (design §2). The supervisor
//! (`celeriac`) starts it with the app's interpreter's libpython, hands it a socket, and asks
//! it for pool children; it imports the app once and forks them. Not meant to be run by hand.

fn main() {
    std::process::exit(celeriac::embed::zygote_main());
}
