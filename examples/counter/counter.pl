#!/usr/bin/perl
# A tiny HTTP counter that keeps its count in memory: each request gets the
# next number. Used to show that a VM's memory survives snapshot/restore/fork.
# Perl is in every Debian base (perl-base), so nothing needs installing.
# It logs each request on stdout (`machinen logs`), and `GET /quit` ends it
# with status 0 (`machinen wait`).
use strict;
use warnings;
use IO::Socket::INET;

my $port = shift // 8080;
my $server = IO::Socket::INET->new(LocalAddr => '0.0.0.0', LocalPort => $port, Listen => 64, ReuseAddr => 1)
  or die "listen on $port: $!\n";
$| = 1;
print STDERR "counter listening on $port\n";
my $count = 0;
while (my $conn = $server->accept) {
    my $request = <$conn> // '';
    while (my $line = <$conn>) { last if $line =~ /^\r?\n$/ }
    $request =~ s/\r?\n$//;
    $count++;
    print "$count $request\n";
    my $body = "$count\n";
    print $conn "HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nContent-Length: " . length($body) . "\r\n\r\n$body";
    close $conn;
    exit 0 if $request =~ m{^GET /quit};
}
